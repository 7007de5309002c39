import csv
import io
import json
import math
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, Response
from fastapi import Query as QueryParam
from pydantic import Field
from sqlalchemy import Row, bindparam, func, insert
from sqlmodel import col, select

from service.api.deps import AdminDep, AnnotatorDep, SessionDep
from service.api.payloads import require_json
from service.api.responses import model_json
from service.auth import PoolScoped
from service.crud import get_pool, label_value
from service.errors import (
    Forbidden,
    InvalidLabel,
    ItemNotFound,
    PoolNotFound,
    UnsupportedMediaType,
    responses,
)
from service.models import Item, Label, Pool, Query, Role, Task, utcnow
from service.schemas import LabelCreate, LabelsCreated, RowId

router = APIRouter(tags=["labels"])

LabelBatch = Annotated[list[LabelCreate], Field(min_length=1, max_length=10_000)]


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


# The statements of this hot route are built once and run with bound parameters: building
# one per request costs more than running it.
_ITEMS = PoolScoped(  # each item with its pool, once per round that queried it
    select(Item.id, Item.pool_id, Pool.task, Pool.classes, Query.round_id)
    .join(Pool, col(Pool.id) == col(Item.pool_id))
    .outerjoin(Query, col(Query.item_id) == col(Item.id))
    .where(col(Item.id).in_(bindparam("item_ids", expanding=True))),
    col(Item.pool_id),
)
_CURRENT = select(  # each annotator's latest label of the items
    Label.id,
    Label.item_id,
    Label.pool_id,
    Label.value_class,
    Label.value_number,
    Label.annotator,
    Label.round_id,
    Label.created_at,
).where(
    col(Label.id).in_(
        select(func.max(Label.id))
        .where(
            col(Label.item_id).in_(bindparam("item_ids", expanding=True)),
            col(Label.annotator).in_(bindparam("annotators", expanding=True)),
        )
        .group_by(col(Label.item_id), col(Label.annotator))
    )
)
_INSERT = insert(Label).returning(col(Label.id), sort_by_parameter_order=True)


@router.post(
    "/labels",
    response_model=LabelsCreated,
    dependencies=[Depends(require_json)],
    responses=responses(ItemNotFound, InvalidLabel, UnsupportedMediaType),
)
def create_labels(
    *,
    session: SessionDep,
    key: AnnotatorDep,
    body: Annotated[
        LabelCreate | LabelBatch,
        Body(
            openapi_examples={
                "one": {"value": {"item_id": 17, "value": "7", "round_id": 3}},
                "many": {"value": [{"item_id": 17, "value": "7"}, {"item_id": 18, "value": "1"}]},
                "regression": {"value": {"item_id": 40, "value": 21.5}},
            }
        ),
    ],
) -> Response:
    """Record one label or many; repeating an annotator's current label changes nothing.

    A label belongs to the round that queried the item (by default the latest such round).
    Labels on items no round queried are seed labels, which only admins may give. To a key
    restricted to some pools, items of other pools do not exist.
    """
    inputs = body if isinstance(body, list) else [body]
    item_ids = sorted({i.item_id for i in inputs})
    # Core rather than ORM execution: these are plain rows, and the ORM's handling of rows
    # and objects costs more than the queries.
    connection = session.connection()
    items: dict[int, Row[Any]] = {}
    queried: dict[int, set[int]] = {}
    statement, access = _ITEMS.for_key(session, key)
    for row in connection.execute(statement, {"item_ids": item_ids, **access}):
        items[row.id] = row
        if row.round_id is not None:
            queried.setdefault(row.id, set()).add(row.round_id)
    missing = [item_id for item_id in item_ids if item_id not in items]
    if missing:
        raise ItemNotFound(f"no items {missing}")

    wanted: list[tuple[int, str | float, int | None, str]] = []
    for i in inputs:
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

    # Each annotator's current label of these items, to make repeats no-ops. Labels are
    # dicts shaped as LabelPublic.
    current = {
        (row.item_id, row.annotator): {**row._asdict(), "value": label_value(row)}
        for row in connection.execute(
            _CURRENT, {"item_ids": item_ids, "annotators": sorted({w[3] for w in wanted})}
        )
    }
    results: list[dict[str, Any]] = []
    created: list[dict[str, Any]] = []
    now = utcnow()
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
        results.append(label)
    if created:
        rows = [
            {
                "pool_id": label["pool_id"],
                "item_id": label["item_id"],
                "value_class": label["value"] if isinstance(label["value"], str) else None,
                "value_number": label["value"] if isinstance(label["value"], float) else None,
                "annotator": label["annotator"],
                "round_id": label["round_id"],
                "created_at": label["created_at"],
            }
            for label in created
        ]
        ids = connection.execute(_INSERT, rows).scalars().all()
        for label, label_id in zip(created, ids, strict=True):
            label["id"] = label_id
    page = LabelsCreated.model_validate({"data": results, "created": len(created)})
    return model_json(page)


EXPORT_FIELDS = ("item_id", "sha256", "split", "value", "annotator", "round_id", "created_at")


@router.get(
    "/pools/{pool_id}/labels",
    response_class=Response,
    responses={
        **responses(PoolNotFound),
        200: {
            "content": {"application/x-ndjson": {}, "text/csv": {}},
            "description": "One line per label: " + ", ".join(EXPORT_FIELDS),
        },
    },
)
def export_labels(
    *,
    session: SessionDep,
    key: AdminDep,
    pool_id: RowId,
    format: Literal["jsonl", "csv"] = "jsonl",
    history: Annotated[
        bool, QueryParam(description="Every label given, not only each item's latest.")
    ] = False,
) -> Response:
    """Export the pool's labels (each item's latest, or the whole history) as JSONL or CSV."""
    pool = get_pool(session, pool_id)
    query = (
        select(Label, Item.sha256, Item.split)
        .join(Item, col(Item.id) == col(Label.item_id))
        .where(Label.pool_id == pool_id)
        .order_by(col(Label.item_id), col(Label.id))
    )
    if not history:
        latest = (
            select(func.max(Label.id)).where(Label.pool_id == pool_id).group_by(col(Label.item_id))
        )
        query = query.where(col(Label.id).in_(latest))
    rows = [
        {
            "item_id": label.item_id,
            "sha256": sha256,
            "split": split,
            "value": label_value(label),
            "annotator": label.annotator,
            "round_id": label.round_id,
            "created_at": label.created_at.isoformat(),
        }
        for label, sha256, split in session.exec(query)
    ]
    out = io.StringIO()
    if format == "csv":
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        media_type = "text/csv"
    else:
        out.writelines(json.dumps(row) + "\n" for row in rows)
        media_type = "application/x-ndjson"
    return Response(
        out.getvalue(),
        media_type=media_type,
        headers={"Content-Disposition": attachment(f"{pool.name}-labels.{format}")},
    )


def attachment(filename: str) -> str:
    """A Content-Disposition for any name (RFC 6266): UTF-8 for clients that read
    `filename*`, an ASCII stand-in for the rest; headers are latin-1 with no line breaks."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
