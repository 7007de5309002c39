"""Storing annotators' labels: each request checked on its own, all of them written at once.

No request handling here: the label writer (service/api/deps.py) gives `plan_labels` the
requests that arrived together (service/api/group_commit.py) and one connection, then
`write_labels` its plan; `store_labels` does both in the caller's transaction.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Integer, Row, String, bindparam, func, insert, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlmodel import col, select

from service.auth import Caller
from service.crud import label_value
from service.errors import Forbidden, InvalidLabel, ItemNotFound, ServiceError
from service.models import Item, Label, Pool, Query, Role, Task, utcnow
from service.schemas import LabelCreate, LabelsCreated
from service.sql import OneOf


@dataclass
class Stored:
    """What `write_labels` did: each request's answer, or the error that refused it, and the
    rounds whose GET /queries pages the new labels changed (those that queried their items)."""

    answers: list[LabelsCreated | ServiceError]
    rounds: set[int]


@dataclass
class Planned:
    """What `plan_labels` read and decided, before anything is written: each request's
    labels (dicts shaped as LabelPublic) and count of new ones, or the error refusing it.
    `write_labels` gives the new labels their ids in place, so a plan is written once."""

    decided: list[tuple[list[dict[str, Any]], int] | ServiceError]
    created: list[dict[str, Any]]  # the new labels, to insert in this order
    rounds: set[int]  # the rounds that queried the new labels' items


@dataclass(frozen=True)
class LabelRequest:
    """One POST /labels: who sends it and what."""

    key: Caller
    inputs: Sequence[LabelCreate]


# Built once and run with bound parameters: building a statement costs more than running it.
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
# Each annotator's latest label of an item, for the (item, annotator) pairs bound as the
# parallel lists item_ids and annotators. PostgreSQL: one descent of the (item, annotator)
# index per pair, the only plan this form has; as a semi-join of max(id)s it may scan the
# whole table, depending on its statistics. SQLite plans that portable form with the index.
_PAIRS = (
    func.unnest(
        bindparam("item_ids", type_=ARRAY(Integer)), bindparam("annotators", type_=ARRAY(String))
    )
    .table_valued("item_id", "annotator")
    .render_derived()
)
_LATEST = (
    select(*_LABEL_COLUMNS)
    .where(col(Label.item_id) == _PAIRS.c.item_id, col(Label.annotator) == _PAIRS.c.annotator)
    .order_by(col(Label.id).desc())
    .limit(1)
    .lateral()
)
_CURRENT_PG = select(_LATEST).select_from(_PAIRS).join(_LATEST, true())
_CURRENT = select(*_LABEL_COLUMNS).where(
    col(Label.id).in_(
        select(func.max(Label.id))
        .where(OneOf(col(Label.item_id), "item_ids"), OneOf(col(Label.annotator), "annotators"))
        .group_by(col(Label.item_id), col(Label.annotator))
    )
)
# New labels. PostgreSQL gets a column of values per array: one statement text whatever the
# count (prepared once, where the rows of a VALUES list make a new text, and psycopg parses
# a text of over 50 parameters anew each time), and one statement however many: atomic.
_NEW_COLUMNS = (
    "pool_id",
    "item_id",
    "value_class",
    "value_number",
    "annotator",
    "round_id",
    "created_at",
)
_NEW = (
    func.unnest(
        *(bindparam(name, type_=ARRAY(Label.__table__.c[name].type)) for name in _NEW_COLUMNS)
    )
    .table_valued(*_NEW_COLUMNS, with_ordinality="n")
    .render_derived()
)
_INSERT_PG = (
    insert(Label)
    .from_select(_NEW_COLUMNS, select(*(_NEW.c[name] for name in _NEW_COLUMNS)).order_by(_NEW.c.n))
    .returning(col(Label.id))
)
_INSERT = insert(Label).returning(col(Label.id), sort_by_parameter_order=True)

# (item id, answer, round id, annotator): one label a request asks for.
Wanted = tuple[int, str | float, int | None, str]


def store_labels(connection: Connection, requests: Sequence[LabelRequest]) -> Stored:
    """Each request's answer, or the error that refuses it as a whole; one refused request
    leaves the others alone: `plan_labels` then `write_labels`, in the caller's transaction.
    Three round trips on PostgreSQL however many requests and labels (SQLite inserts row by
    row, in process)."""
    return write_labels(connection, plan_labels(connection, requests))


def plan_labels(connection: Connection, requests: Sequence[LabelRequest]) -> Planned:
    """Read what the requests need and decide each one's labels; writes nothing."""
    # Core rather than the ORM: these are plain rows, and the ORM's handling of rows and
    # objects costs more than the queries.
    item_ids = sorted({i.item_id for request in requests for i in request.inputs})
    items: dict[int, Row[Any]] = {}
    queried: dict[int, set[int]] = {}
    for row in connection.execute(_ITEMS, {"item_ids": item_ids}):
        items[row.id] = row
        if row.round_id is not None:
            queried.setdefault(row.id, set()).add(row.round_id)

    checked: list[list[Wanted] | ServiceError] = []
    for request in requests:
        try:
            checked.append(_check(request, items, queried))
        except ServiceError as error:
            checked.append(error)
    accepted = [wanted for wanted in checked if not isinstance(wanted, ServiceError)]
    if not accepted:
        return Planned(checked, [], set())  # type: ignore[arg-type]  # every entry is an error

    # Each annotator's current label of these items, to make repeats no-ops. Labels are
    # dicts shaped as LabelPublic; requests see each other's labels in arrival order.
    current = _current(connection, {(w[0], w[3]) for wanted in accepted for w in wanted})
    now = utcnow()
    created: list[dict[str, Any]] = []
    answers: list[tuple[list[dict[str, Any]], int] | ServiceError] = []
    for wanted in checked:
        if isinstance(wanted, ServiceError):
            answers.append(wanted)
            continue
        results, new = [], 0
        for item_id, answer, round_id, annotator in wanted:
            label = current.get((item_id, annotator))
            if label is None or label["value"] != answer:
                label = {
                    "item_id": item_id,
                    "pool_id": items[item_id].pool_id,
                    "value": answer,
                    "annotator": annotator,
                    "round_id": round_id,
                    "created_at": now,
                }
                created.append(label)
                current[(item_id, annotator)] = label
                new += 1
            results.append(label)
        answers.append((results, new))
    rounds = {round_id for label in created for round_id in queried.get(label["item_id"], ())}
    return Planned(answers, created, rounds)


def write_labels(connection: Connection, planned: Planned) -> Stored:
    """Insert the planned labels and answer each request."""
    # On the label writer's connection the INSERT commits as it returns (make_async_engine):
    # after it, only answers are assembled, from what plan_labels checked.
    if planned.created:
        for label, label_id in zip(
            planned.created, _insert(connection, planned.created), strict=True
        ):
            label["id"] = label_id
    return Stored(
        [
            answer
            if isinstance(answer, ServiceError)
            else LabelsCreated.model_validate({"data": answer[0], "created": answer[1]})
            for answer in planned.decided
        ],
        planned.rounds,
    )


def _check(
    request: LabelRequest,
    items: dict[int, Row[Any]],
    queried: dict[int, set[int]],
) -> list[Wanted]:
    """The labels `request` asks for; a ServiceError when any of them is refused."""
    key = request.key
    pools = key.pools

    def exists(item_id: int) -> bool:
        # To a key restricted to some pools, the items of the others do not exist.
        return item_id in items and (pools is None or items[item_id].pool_id in pools)

    missing = sorted({i.item_id for i in request.inputs if not exists(i.item_id)})
    if missing:
        raise ItemNotFound(f"no items {missing}")
    wanted = []
    for i in request.inputs:
        item = items[i.item_id]
        answer = _answer(i.value, item.task, item.classes, i.item_id)
        rounds = queried.get(i.item_id, set())
        if i.round_id is not None and i.round_id not in rounds:
            raise InvalidLabel(f"item {i.item_id} was not queried by round {i.round_id}")
        round_id = i.round_id if i.round_id is not None else max(rounds, default=None)
        if round_id is None and key.role != Role.admin:
            raise Forbidden(
                f"item {i.item_id} was not queried by any round; only admins give seed labels"
            )
        wanted.append((i.item_id, answer, round_id, i.annotator or key.name))
    return wanted


def _answer(value: str | float, task: str, classes: list[str] | None, item_id: int) -> str | float:
    """The value as stored: a class name of the pool, or a finite regression target."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidLabel(f"item {item_id}: a label must be a finite number, not {value}")
    if task == Task.regression:
        if isinstance(value, str):
            raise InvalidLabel(f"item {item_id}: a regression label is a number, not {value!r}")
        return float(value)
    assert classes is not None
    # Accept 7 for the class "7": annotation tools often send digit classes as numbers.
    name = value if isinstance(value, str) else (str(int(value)) if value == int(value) else "")
    if name not in classes:
        raise InvalidLabel(f"item {item_id}: {value!r} is not a class of its pool {classes}")
    return name


def _current(
    connection: Connection, pairs: set[tuple[int, str]]
) -> dict[tuple[int, str], dict[str, Any]]:
    """The latest label of each (item, annotator) pair that has one, as a LabelPublic dict."""
    if connection.dialect.name == "postgresql":
        statement, params = (
            _CURRENT_PG,
            {"item_ids": [p[0] for p in pairs], "annotators": [p[1] for p in pairs]},
        )
    else:
        statement, params = (
            _CURRENT,
            {
                "item_ids": sorted({p[0] for p in pairs}),
                "annotators": sorted({p[1] for p in pairs}),
            },
        )
    return {
        (row.item_id, row.annotator): {**row._asdict(), "value": label_value(row)}
        for row in connection.execute(statement, params)
    }


def _insert(connection: Connection, labels: list[dict[str, Any]]) -> Sequence[int]:
    """Insert `labels` (dicts shaped as LabelPublic); their new ids, in the same order."""
    rows = [_row(label) for label in labels]
    if connection.dialect.name == "postgresql":
        columns = {name: [row[name] for row in rows] for name in _NEW_COLUMNS}
        # Serial ids are drawn in the order rows go in (ORDER BY n), that of `labels`: sorted,
        # they match it (SQLAlchemy relies on the same for sort_by_parameter_order).
        return sorted(connection.execute(_INSERT_PG, columns).scalars())
    return connection.execute(_INSERT, rows).scalars().all()


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
