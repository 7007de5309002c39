"""The hot paths (GET /queries, POST /labels) run a fixed number of SQL statements, however
many items they touch: no N+1."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlmodel import Session

from service.blobs import FileBlobStore
from tests.service.factories import make_items, make_pool, make_round


@contextmanager
def statements(session: Session) -> Iterator[list[str]]:
    seen: list[str] = []
    engine = session.get_bind().engine

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not statement.startswith(("SAVEPOINT", "RELEASE", "ROLLBACK")):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.fixture
def round_of(session: Session, blobs: FileBlobStore):  # type: ignore[no-untyped-def]
    def build(n: int) -> tuple[int, list[int]]:
        pool = make_pool(session)
        items = make_items(session, blobs, pool, n, start=n)
        return make_round(session, pool, queried=items).id, [i.id for i in items]  # type: ignore[return-value]

    return build


@pytest.mark.parametrize("annotator_param", ["", "&annotator=alice"])
def test_get_queries_runs_a_fixed_number_of_statements(
    client: TestClient, session: Session, annotator: dict, round_of, annotator_param: str
) -> None:
    counts = []
    for n in (2, 30):
        round_id, _ = round_of(n)
        session.commit()
        with statements(session) as seen:
            page = client.get(f"/queries/{round_id}?limit=100{annotator_param}", headers=annotator)
        assert len(page.json()["data"]) == n
        counts.append(len(seen))
    assert counts[0] == counts[1] <= 5


def test_post_labels_runs_a_fixed_number_of_statements(
    client: TestClient, session: Session, annotator: dict, round_of
) -> None:
    counts = []
    for n in (2, 30):
        _, item_ids = round_of(n)
        session.commit()
        batch = [{"item_id": i, "value": "3"} for i in item_ids]
        with statements(session) as seen:
            response = client.post("/labels", json=batch, headers=annotator)
        assert response.json()["created"] == n
        if session.get_bind().dialect.name == "sqlite":
            # SQLite cannot promise RETURNING order, so SQLAlchemy inserts ORM rows one by
            # one there: in-process calls, not round trips. Count distinct statements.
            seen = list(dict.fromkeys(seen))
        counts.append(len(seen))
    assert counts[0] == counts[1] <= 6
