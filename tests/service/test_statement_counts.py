"""The hot paths (GET /queries, POST /labels) run a fixed number of SQL statements, however
many items they touch: no N+1."""

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from service.auth import create_key, live_keys
from service.blobs import FileBlobStore
from service.models import Role, Round
from tests.service.factories import make_items, make_pool, make_round, statements


@pytest.fixture(autouse=True)
def every_request_looks_up_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Else the first request would remember the key and the second skip its look-up:
    count the same statements for both."""
    monkeypatch.setattr(live_keys, "ttl", 0)


@pytest.fixture
def round_of(session: Session, blobs: FileBlobStore):  # type: ignore[no-untyped-def]
    def build(n: int) -> tuple[int, list[int]]:
        pool = make_pool(session)
        items = make_items(session, blobs, pool, n, start=n)
        return make_round(session, pool, queried=items).id, [i.id for i in items]  # type: ignore[return-value]

    return build


# The key, the round (with its count of queries) and the page; or the key, the round, the
# leases and the leased rows.
@pytest.mark.parametrize(("annotator_param", "most"), [("", 3), ("&annotator=alice", 4)])
def test_get_queries_runs_a_fixed_number_of_statements(
    client: TestClient,
    session: Session,
    annotator: dict,
    round_of,
    annotator_param: str,
    most: int,
) -> None:
    counts = []
    for n in (2, 30):
        round_id, _ = round_of(n)
        session.commit()
        with statements(session.get_bind().engine) as seen:
            page = client.get(f"/queries/{round_id}?limit=100{annotator_param}", headers=annotator)
        assert len(page.json()["data"]) == n
        counts.append(len(seen))
    assert counts[0] == counts[1] <= most


def test_post_labels_runs_a_fixed_number_of_statements(
    client: TestClient, session: Session, annotator: dict, round_of
) -> None:
    counts = []
    for n in (2, 30):
        _, item_ids = round_of(n)
        session.commit()
        batch = [{"item_id": i, "value": "3"} for i in item_ids]
        with statements(session.get_bind().engine) as seen:
            response = client.post("/labels", json=batch, headers=annotator)
        assert response.json()["created"] == n
        if session.get_bind().dialect.name == "sqlite":
            # SQLite cannot promise RETURNING order, so SQLAlchemy inserts ORM rows one by
            # one there: in-process calls, not round trips. Count distinct statements.
            seen = list(dict.fromkeys(seen))
        counts.append(len(seen))
    # The key, then READ and INSERT; on SQLite, the items and their current labels apart.
    most = 3 if session.get_bind().dialect.name == "postgresql" else 4
    assert counts[0] == counts[1] <= most


def test_a_keys_pools_are_read_with_the_key(client: TestClient, session: Session, round_of) -> None:
    """A restricted key costs no statement more than one that sees every pool."""
    round_id, _ = round_of(3)
    pool_id = session.get(Round, round_id).pool_id  # type: ignore[union-attr]
    counts = {}
    for name, pools in (("every pool", []), ("one pool", [pool_id])):
        _, key = create_key(session, name=name, role=Role.annotator, pools=pools)
        session.commit()
        counts[name] = []
        for _ in range(2):
            with statements(session.get_bind().engine) as seen:
                response = client.get(
                    f"/queries/{round_id}", headers={"Authorization": f"Bearer {key}"}
                )
            assert response.status_code == 200
            counts[name].append(len(seen))
    assert counts["one pool"] == counts["every pool"] == [counts["every pool"][0]] * 2
