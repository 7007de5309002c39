"""Reading what `plan_labels` needs and storing the labels it plans, for many requests at
once (service/api/deps.py gathers them).

On PostgreSQL that is two statements, READ and INSERT, however many requests and labels.
The API's label writer runs them on psycopg's own connection (`PostgresLabels`):
SQLAlchemy's execution layer costs the event loop about as much CPU as the round trip
itself (docs/reliability.md). `store_labels` runs the same statements on a SQLAlchemy
connection, and SQLite's portable ones, in the caller's transaction: SQLite's label writer
(`SqliteLabels`) and the tests use it.
"""

import functools
import json
import logging
from collections.abc import Generator, Iterable, Sequence
from typing import Any

import psycopg
from sqlalchemy import Connection, func, insert
from sqlmodel import col, select

from service.crud import label_value
from service.db import connect_async, is_postgres, make_sqlite_async_engine
from service.errors import database_unavailable
from service.labels import Known, KnownItem, LabelRequest, Pair, Stored, pairs, plan_labels
from service.models import Item, Label, Pool, Query
from service.sql import OneOf

log = logging.getLogger(__name__)

# One row per (item, annotator) pair whose item exists: the item with its pool's task and
# classes, the rounds that queried it, and the annotator's latest label (one descent of the
# (item, annotator, id) index; a semi-join of max(id)s may scan the whole table instead).
# Arrays, bound in binary: one statement text whatever the count, which psycopg prepares
# once it has run a few times.
READ = """\
SELECT pair.item_id, pair.annotator, items.pool_id, pools.task, pools.classes::text,
       ARRAY(SELECT round_id FROM queries WHERE queries.item_id = pair.item_id),
       latest.id, latest.value_class, latest.value_number, latest.round_id, latest.created_at
FROM unnest(%(item_ids)b::integer[], %(annotators)b::varchar[]) AS pair (item_id, annotator)
JOIN items ON items.id = pair.item_id
JOIN pools ON pools.id = items.pool_id
LEFT JOIN LATERAL (
    SELECT id, value_class, value_number, round_id, created_at FROM labels
    WHERE labels.item_id = pair.item_id AND labels.annotator = pair.annotator
    ORDER BY id DESC LIMIT 1
) AS latest ON true
"""
# One statement however many labels: all of them or none, without a transaction. Serial
# ids are drawn in the order rows go in (ORDER BY n), that of the labels: sorted, they
# match it (SQLAlchemy relies on the same for sort_by_parameter_order).
INSERT = """\
INSERT INTO labels (pool_id, item_id, value_class, value_number, annotator, round_id, created_at)
SELECT pool_id, item_id, value_class, value_number, annotator, round_id, created_at
FROM unnest(
    %(pool_id)b::integer[], %(item_id)b::integer[], %(value_class)b::varchar[],
    %(value_number)b::float8[], %(annotator)b::varchar[], %(round_id)b::integer[],
    %(created_at)b::timestamptz[]
) WITH ORDINALITY
    AS new (pool_id, item_id, value_class, value_number, annotator, round_id, created_at, n)
ORDER BY n
RETURNING id
"""


# Each statement has one good plan whatever its arrays hold: planning it anew for each batch
# (a custom plan) costs PostgreSQL as much as running it.
PLAN_CACHE_MODE = "force_generic_plan"
APPLICATION_NAME = "ally label writer"

Statement = tuple[str, dict[str, list[Any]]]
Rows = Sequence[Sequence[Any]]


def postgres_batch(requests: Sequence[LabelRequest]) -> Generator[Statement, Rows, Stored]:
    """A batch's work on PostgreSQL without its I/O: yields READ, then INSERT if any label is
    new, each sent back its rows; returns the answers. `PostgresLabels` runs it on psycopg,
    `store_labels` on a SQLAlchemy connection."""
    rows = yield READ, _read_params(pairs(requests))
    planned = plan_labels(requests, _known(rows))
    if not planned.created:
        return planned.stored([])
    rows = yield INSERT, _insert_params(planned.created)
    return planned.stored(sorted(label_id for (label_id,) in rows))


class PostgresLabels:
    """The API's label writer on PostgreSQL: one connection, one batch at a time, each
    statement committed on its own (autocommit: no BEGIN, no COMMIT)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._connection: psycopg.AsyncConnection[Any] | None = None  # opened on first use

    async def store(self, requests: Sequence[LabelRequest]) -> Stored:
        batch = postgres_batch(requests)
        read = next(batch)
        try:
            was_open = self._connection is not None and not self._connection.closed
            try:
                rows = await self._run(*read)
            except psycopg.OperationalError as error:
                if not (was_open and self._connection is not None and self._connection.closed):
                    raise
                # The connection is not pinged before use: one the server dropped while
                # idle fails here, before anything is written. Read again on a new one.
                log.warning("POST /labels: %s; reading again on a new connection", error)
                rows = await self._run(*read)
            insert = batch.send(rows)
            # Not run again: whether an INSERT cut off committed is unknown, and run again,
            # a request answering an item twice would store its first answer twice.
            batch.send(await self._run(*insert))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except psycopg.OperationalError as error:
            # Lost or refused connections, and statements the server could not run for now.
            log.warning("POST /labels: database unavailable: %s", error)
            raise database_unavailable() from error
        raise AssertionError("postgres_batch runs at most two statements")

    async def connection(self) -> psycopg.AsyncConnection[Any]:
        """The writer's connection, opened on first use and again after a loss."""
        if self._connection is None or self._connection.closed:
            connection = await connect_async(self.database_url, APPLICATION_NAME)
            try:
                # A SET rather than a startup option: it keeps the URL's own options, and
                # poolers such as PgBouncer refuse startup options they do not know.
                await connection.execute(f"SET plan_cache_mode = {PLAN_CACHE_MODE}")
            except BaseException:
                await connection.close()
                raise
            self._connection = connection
        return self._connection

    async def _run(self, statement: str, params: dict[str, list[Any]]) -> Rows:
        cursor = await (await self.connection()).execute(statement, params)
        return await cursor.fetchall()

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


class SqliteLabels:
    """The API's label writer on SQLite: `store_labels` in a transaction, run by aiosqlite
    on its own thread."""

    def __init__(self, database_url: str) -> None:
        self.engine = make_sqlite_async_engine(database_url)

    async def store(self, requests: Sequence[LabelRequest]) -> Stored:
        async with self.engine.begin() as connection:
            return await connection.run_sync(store_labels, requests)

    async def close(self) -> None:
        await self.engine.dispose()


LabelStore = PostgresLabels | SqliteLabels


def label_store(database_url: str) -> LabelStore:
    """The label writer's store for the database of `database_url`."""
    return PostgresLabels(database_url) if is_postgres(database_url) else SqliteLabels(database_url)


def store_labels(connection: Connection, requests: Sequence[LabelRequest]) -> Stored:
    """Each request's answer, or the error that refuses it as a whole, its labels stored in
    the caller's transaction: READ and INSERT on PostgreSQL (`postgres_batch`); on SQLite,
    two reads and an INSERT row by row (in process, no round trips)."""
    if connection.dialect.name == "postgresql":
        batch = postgres_batch(requests)
        try:
            statement = next(batch)
            while True:
                statement = batch.send(connection.exec_driver_sql(*statement).all())
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
    planned = plan_labels(requests, _read_portably(connection, pairs(requests)))
    rows = [_row(label) for label in planned.created]
    return planned.stored(connection.execute(_INSERT, rows).scalars().all() if rows else [])


def _read_params(wanted: list[Pair]) -> dict[str, list[Any]]:
    return {"item_ids": [p[0] for p in wanted], "annotators": [p[1] for p in wanted]}


_classes = functools.lru_cache(maxsize=1024)(json.loads)  # a pool's, parsed once


def _known(rows: Iterable[Sequence[Any]]) -> Known:
    """READ's rows as `plan_labels` takes them."""
    items: dict[int, KnownItem] = {}
    current: dict[Pair, dict[str, Any]] = {}
    for item_id, name, pool_id, task, classes, rounds, *latest in rows:
        if item_id not in items:
            classes = None if classes is None else _classes(classes)
            items[item_id] = KnownItem(pool_id, task, classes, set(rounds))
        label_id, value_class, value_number, round_id, created_at = latest
        if label_id is not None:
            current[(item_id, name)] = {
                "id": label_id,
                "item_id": item_id,
                "pool_id": pool_id,
                "value": value_number if value_class is None else value_class,
                "annotator": name,
                "round_id": round_id,
                "created_at": created_at,
            }
    return Known(items, current)


def _insert_params(labels: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """INSERT's parameters: an array per column."""
    rows = [_row(label) for label in labels]
    return {name: [row[name] for row in rows] for name in rows[0]}


def _row(label: dict[str, Any]) -> dict[str, Any]:
    """A label dict as a row of the labels table."""
    value = label["value"]
    return {
        "pool_id": label["pool_id"],
        "item_id": label["item_id"],
        "value_class": value if isinstance(value, str) else None,
        "value_number": value if isinstance(value, float) else None,
        "annotator": label["annotator"],
        "round_id": label["round_id"],
        "created_at": label["created_at"],
    }


# SQLite's statements, built once and run with bound parameters: building a statement
# costs more than running it. Core rather than the ORM: these are plain rows.
_ITEMS = (  # each item with its pool, once per round that queried it
    select(Item.id, Item.pool_id, Pool.task, Pool.classes, Query.round_id)
    .join(Pool, col(Pool.id) == col(Item.pool_id))
    .outerjoin(Query, col(Query.item_id) == col(Item.id))
    .where(OneOf(col(Item.id), "item_ids"))
)
_LABEL_COLUMNS = (
    Label.id,
    Label.item_id,
    Label.pool_id,
    Label.value_class,
    Label.value_number,
    Label.annotator,
    Label.round_id,
    Label.created_at,
)
_CURRENT = select(*_LABEL_COLUMNS).where(
    col(Label.id).in_(
        select(func.max(Label.id))
        .where(OneOf(col(Label.item_id), "item_ids"), OneOf(col(Label.annotator), "annotators"))
        .group_by(col(Label.item_id), col(Label.annotator))
    )
)
_INSERT = insert(Label).returning(col(Label.id), sort_by_parameter_order=True)


def _read_portably(connection: Connection, wanted: list[Pair]) -> Known:
    """What READ reads, in two statements SQLite can run."""
    items: dict[int, KnownItem] = {}
    item_ids = sorted({p[0] for p in wanted})
    for row in connection.execute(_ITEMS, {"item_ids": item_ids}):
        item = items.setdefault(row.id, KnownItem(row.pool_id, row.task, row.classes))
        if row.round_id is not None:
            item.rounds.add(row.round_id)
    annotators = sorted({p[1] for p in wanted})
    current = {
        (row.item_id, row.annotator): {**row._asdict(), "value": label_value(row)}
        for row in connection.execute(_CURRENT, {"item_ids": item_ids, "annotators": annotators})
    }
    return Known(items, current)
