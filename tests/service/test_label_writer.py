"""Labels of many requests written together (service.label_writer.store_labels, and the group
commit behind POST /labels): each request is answered, or refused, as if it came alone."""

from typing import Any

import anyio
import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, func, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select

from service.api.deps import get_blobs
from service.app import create_app
from service.auth import Caller, create_key
from service.blobs import FileBlobStore
from service.db import migrate
from service.errors import InvalidLabel, ItemNotFound
from service.label_writer import INSERT, PLAN_CACHE_MODE, READ, PostgresLabels, store_labels
from service.labels import LabelRequest
from service.models import Item, Label, Role
from service.schemas import LabelCreate, LabelsCreated
from service.settings import settings
from tests.service.factories import make_items, make_pool, make_round, serving

ALICE = Caller(1, "alice", Role.annotator, None)
BOB = Caller(2, "bob", Role.annotator, None)


def label(item: Item, value: str) -> LabelCreate:
    return LabelCreate(item_id=item.id, value=value)  # type: ignore[arg-type]


def test_one_refused_request_leaves_the_others_of_its_batch_alone(
    session: Session, blobs: FileBlobStore
) -> None:
    pool = make_pool(session)
    items = make_items(session, blobs, pool, 3)
    first_round = make_round(session, pool, queried=items[:2])
    make_round(session, pool, queried=items[2:])  # only the refused request labels its item
    before = session.exec(select(func.count()).select_from(Label)).one()

    stored = store_labels(
        session.connection(),
        [
            LabelRequest(ALICE, [label(items[0], "1"), label(items[1], "2")]),
            LabelRequest(BOB, [label(items[2], "3"), label(items[0], "cat")]),
            LabelRequest(BOB, [label(items[1], "4")]),
        ],
    )
    answers = stored.answers
    assert stored.rounds == {first_round.id}  # the rounds whose pages the new labels change

    first, refused, third = answers
    assert isinstance(first, LabelsCreated) and isinstance(third, LabelsCreated)
    assert [(a.item_id, a.value, a.annotator) for a in first.data + third.data] == [
        (items[0].id, "1", "alice"),
        (items[1].id, "2", "alice"),
        (items[1].id, "4", "bob"),
    ]
    assert isinstance(refused, InvalidLabel) and "'cat' is not a class" in refused.detail
    stored = session.exec(
        select(Label.item_id, Label.value_class, Label.annotator).order_by(col(Label.id))
    ).all()[before:]
    # Bob's label of item 2 went down with his refused request; his other request stands.
    assert stored == [(a.item_id, a.value, a.annotator) for a in first.data + third.data]
    assert {a.id for a in first.data + third.data} == set(
        session.exec(select(Label.id).order_by(col(Label.id))).all()[before:]
    )


def test_requests_of_one_batch_see_each_others_labels_in_arrival_order(
    session: Session, blobs: FileBlobStore
) -> None:
    pool = make_pool(session)
    [item] = make_items(session, blobs, pool, 1)
    make_round(session, pool, queried=[item])

    first, repeat, change = store_labels(
        session.connection(),
        [
            LabelRequest(ALICE, [label(item, "1")]),
            LabelRequest(ALICE, [label(item, "1")]),
            LabelRequest(ALICE, [label(item, "2")]),
        ],
    ).answers

    assert isinstance(first, LabelsCreated) and isinstance(repeat, LabelsCreated)
    assert isinstance(change, LabelsCreated)
    assert (first.created, repeat.created, change.created) == (1, 0, 1)
    assert repeat.data == first.data  # the repeat is the same label, id and time included
    assert change.data[0].id > first.data[0].id
    values = session.exec(select(Label.value_class).where(Label.item_id == item.id)).all()
    assert values == ["1", "2"]


def test_a_restricted_key_finds_no_item_of_another_pool_while_others_do(
    session: Session, blobs: FileBlobStore
) -> None:
    mine, theirs = make_pool(session), make_pool(session)
    [my_item] = make_items(session, blobs, mine, 1)
    [their_item] = make_items(session, blobs, theirs, 1, start=1)
    make_round(session, mine, queried=[my_item])
    make_round(session, theirs, queried=[their_item])
    restricted = Caller(3, "rita", Role.annotator, frozenset({mine.id}))  # type: ignore[arg-type]

    refused, accepted = store_labels(
        session.connection(),
        [
            LabelRequest(restricted, [label(my_item, "1"), label(their_item, "1")]),
            LabelRequest(ALICE, [label(their_item, "1")]),
        ],
    ).answers

    assert isinstance(refused, ItemNotFound) and refused.detail == f"no items [{their_item.id}]"
    assert isinstance(accepted, LabelsCreated) and accepted.created == 1


@pytest.fixture
def served_database(empty_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """A database of the test's own, as the database of the app the test serves."""
    url = empty_engine.url.render_as_string(hide_password=False)
    monkeypatch.setattr(settings, "database_url", url)
    migrate(empty_engine)
    return empty_engine


@pytest.mark.anyio
async def test_concurrent_posts_through_the_group_commit_are_each_answered_and_stored(
    served_database: Engine, blobs: FileBlobStore
) -> None:
    with Session(served_database) as session:
        pool = make_pool(session)
        items = make_items(session, blobs, pool, 24)
        round_id = make_round(session, pool, queried=items).id
        _, key = create_key(session, name="alice", role=Role.annotator)
        session.commit()
        item_ids = [item.id for item in items]
    app = create_app()  # sessions and the label writer as in production
    app.dependency_overrides[get_blobs] = lambda: blobs
    # Every fourth request names a class the pool does not have.
    bodies = [
        {"item_id": item_id, "value": "cat" if n % 4 == 3 else str(n % 10), "round_id": round_id}
        for n, item_id in enumerate(item_ids)
    ]
    answers: dict[int, httpx.Response] = {}
    async with serving(app, key) as client:

        async def post(n: int) -> None:
            answers[n] = await client.post("/labels", json=bodies[n])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as requests:
                for n in range(len(bodies)):
                    requests.start_soon(post, n)

    accepted = {n for n in answers if n % 4 != 3}
    for n, response in answers.items():
        if n in accepted:
            assert response.status_code == 200, response.text
            [stored] = response.json()["data"]
            assert (stored["item_id"], stored["value"]) == (
                bodies[n]["item_id"],
                bodies[n]["value"],
            )
        else:
            assert response.status_code == 400 and response.json()["error"] == "InvalidLabel"
    with Session(served_database) as session:
        rows = session.exec(select(Label.id, Label.item_id, Label.value_class)).all()
    assert sorted(rows) == sorted(
        (answers[n].json()["data"][0]["id"], bodies[n]["item_id"], bodies[n]["value"])
        for n in accepted
    )


def _served(engine: Engine, blobs: FileBlobStore, items: int) -> tuple[FastAPI, str, list[int]]:
    """The app, an annotator key, and `items` items a ready round queried."""
    with Session(engine) as session:
        pool = make_pool(session)
        made = make_items(session, blobs, pool, items)
        make_round(session, pool, queried=made)
        _, key = create_key(session, name="alice", role=Role.annotator)
        session.commit()
        item_ids = [item.id for item in made]
    app = create_app()
    app.dependency_overrides[get_blobs] = lambda: blobs
    return app, key, item_ids  # type: ignore[return-value]


def _labels_in(engine: Engine) -> list[tuple[int, int, str]]:
    with Session(engine) as session:
        return list(session.exec(select(Label.id, Label.item_id, Label.value_class)).all())


@pytest.mark.anyio
async def test_a_request_larger_than_one_insert_statement_is_stored_whole_and_in_order(
    served_database: Engine, blobs: FileBlobStore
) -> None:
    app, key, [item_id] = _served(served_database, blobs, 1)
    # Each answer differs from the one before, so each is a new label.
    body = [{"item_id": item_id, "value": str(n % 2)} for n in range(1_500)]
    async with serving(app, key) as client:
        response = await client.post("/labels", json=body)

    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert response.json()["created"] == 1_500
    assert [label["value"] for label in data] == [label["value"] for label in body]
    ids = [label["id"] for label in data]
    assert len(set(ids)) == 1_500
    assert sorted(_labels_in(served_database)) == [
        (i, item_id, v["value"]) for i, v in zip(ids, body, strict=True)
    ]


# The database refuses a label "9" (a stand-in for any failure of the INSERT itself).
REFUSE_NINES = {
    "sqlite": [
        """CREATE TRIGGER refuse_nines BEFORE INSERT ON labels WHEN NEW.value_class = '9'
           BEGIN SELECT RAISE(ABORT, 'no nines'); END"""
    ],
    "postgresql": [
        """CREATE FUNCTION refuse_nines() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'no nines'; END $$""",
        """CREATE TRIGGER refuse_nines BEFORE INSERT ON labels FOR EACH ROW
           WHEN (NEW.value_class = '9') EXECUTE FUNCTION refuse_nines()""",
    ],
}


@pytest.mark.anyio
@pytest.mark.parametrize("size", [3, 1_500])  # within one INSERT statement, and beyond
async def test_a_request_the_database_refuses_leaves_none_of_its_labels(
    served_database: Engine, blobs: FileBlobStore, size: int
) -> None:
    app, key, [item_id, other_id] = _served(served_database, blobs, 2)
    with served_database.begin() as connection:
        for statement in REFUSE_NINES[served_database.dialect.name]:
            connection.execute(text(statement))
    body = [{"item_id": item_id, "value": str(n % 2)} for n in range(size - 1)]
    body.append({"item_id": item_id, "value": "9"})  # refused as the last row goes in
    async with serving(app, key) as client:
        # Answered with a 500. (SQLite's writer runs on SQLAlchemy, PostgreSQL's on psycopg.)
        with pytest.raises((DBAPIError, psycopg.Error), match="no nines"):
            await client.post("/labels", json=body)
        accepted = await client.post("/labels", json={"item_id": other_id, "value": "1"})

    assert accepted.status_code == 200, accepted.text  # the writer goes on
    assert [(i, v) for _, i, v in _labels_in(served_database)] == [(other_id, "1")]


@pytest.mark.anyio
@pytest.mark.parametrize("empty_engine", ["postgresql"], indirect=True)
async def test_a_batch_whose_idle_connection_the_server_dropped_is_read_again_on_a_new_one(
    served_database: Engine, blobs: FileBlobStore, caplog: pytest.LogCaptureFixture
) -> None:
    app, key, item_ids = _served(served_database, blobs, 2)
    async with serving(app, key) as client:
        first = await client.post("/labels", json={"item_id": item_ids[0], "value": "1"})
        # The writer's pooled connection (and every other of this database) goes away idle.
        with served_database.connect() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        second = await client.post("/labels", json={"item_id": item_ids[1], "value": "2"})

    assert (first.status_code, second.status_code) == (200, 200), second.text
    assert [r.message for r in caplog.records if "reading again" in r.message] != []
    assert sorted((i, v) for _, i, v in _labels_in(served_database)) == [
        (item_ids[0], "1"),
        (item_ids[1], "2"),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("empty_engine", ["postgresql"], indirect=True)
async def test_a_batch_cut_off_after_its_insert_is_a_503_and_is_not_written_again(
    served_database: Engine, blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether such an INSERT committed is unknown to the writer; run again, a request that
    answers an item twice would store its first answer twice. (On SQLite the writer's
    transaction keeps all of a batch or none.)"""
    app, key, [item_id] = _served(served_database, blobs, 1)
    run = PostgresLabels._run
    reads = []

    async def insert_then_lose_the_connection(self: Any, statement: str, params: Any) -> Any:
        rows = await run(self, statement, params)
        if statement == READ:
            reads.append(params)
            return rows
        await (await self.connection()).close()  # as the server's end would leave it
        raise psycopg.OperationalError("connection lost")

    monkeypatch.setattr(PostgresLabels, "_run", insert_then_lose_the_connection)
    body = [{"item_id": item_id, "value": "1"}, {"item_id": item_id, "value": "0"}]
    async with serving(app, key) as client:
        response = await client.post("/labels", json=body)

    assert response.status_code == 503 and response.json()["error"] == "DatabaseUnavailable"
    assert len(reads) == 1
    assert [v for _, _, v in sorted(_labels_in(served_database))] == ["1", "0"]


@pytest.mark.anyio
@pytest.mark.parametrize("empty_engine", ["postgresql"], indirect=True)
async def test_labels_are_read_through_an_index_whatever_the_table_holds(
    served_database: Engine, blobs: FileBlobStore
) -> None:
    """The writer's READ stays index look-ups on a large, analyzed labels table, planned on
    the writer's connection (once, for any arrays), where a plan may well prefer scanning
    the whole table: for a semi-join, or backwards through the ids for ORDER BY id LIMIT 1."""
    with Session(served_database) as session:
        pool = make_pool(session)
        items = make_items(session, blobs, pool, 20)
        make_round(session, pool, queried=items)
        session.commit()
        pool_id, item_ids = pool.id, [item.id for item in items]
    with served_database.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO labels (pool_id, item_id, value_class, annotator, created_at) "
                "SELECT :pool, :first + n % 20, (n % 10)::text, 'annotator-' || n / 20 % 8, "
                "now() FROM generate_series(1, 12000) AS n"
            ),
            {"pool": pool_id, "first": item_ids[0]},
        )
        connection.execute(text("ANALYZE labels"))
    params = {"item_ids": item_ids[:9], "annotators": [f"annotator-{n}" for n in range(9)]}
    writer = PostgresLabels(served_database.url.render_as_string(hide_password=False))
    try:
        connection = await writer.connection()
        await connection.execute(READ, params, prepare=True)
        cursor = await connection.execute(
            "SELECT current_setting('plan_cache_mode'), name FROM pg_prepared_statements"
            " WHERE statement LIKE 'SELECT pair.item_id%'"
        )
        [(mode, name)] = await cursor.fetchall()
        # EXPLAIN EXECUTE takes no bound parameters: literals, bound in the client.
        explain = psycopg.AsyncClientCursor(connection)
        await explain.execute(f"EXPLAIN EXECUTE {name}(%(item_ids)s, %(annotators)s)", params)
        plan = "\n".join(row[0] for row in await explain.fetchall())
    finally:
        await writer.close()

    assert mode == PLAN_CACHE_MODE == "force_generic_plan"
    assert "Index Scan Backward using ix_labels_item_id_annotator_id on labels" in plan, plan
    assert "Seq Scan on labels" not in plan and "pk_labels" not in plan, plan


@pytest.mark.anyio
@pytest.mark.parametrize("empty_engine", ["postgresql"], indirect=True)
async def test_the_writer_runs_two_statements_per_batch_however_many_labels(
    served_database: Engine, blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, key, item_ids = _served(served_database, blobs, 30)
    run = PostgresLabels._run
    statements: list[str] = []

    async def counted(self: Any, statement: str, params: Any) -> Any:
        statements.append(statement)
        return await run(self, statement, params)

    monkeypatch.setattr(PostgresLabels, "_run", counted)
    counts = []
    async with serving(app, key) as client:
        for batch in (item_ids[:2], item_ids[2:]):
            statements.clear()
            response = await client.post(
                "/labels", json=[{"item_id": i, "value": "3"} for i in batch]
            )
            assert response.json()["created"] == len(batch)
            counts.append(statements.copy())
        statements.clear()  # a repeat: nothing to insert
        await client.post("/labels", json={"item_id": item_ids[0], "value": "3"})
        counts.append(statements.copy())

    assert counts == [[READ, INSERT], [READ, INSERT], [READ]]
