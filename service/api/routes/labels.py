import csv
import io
import json
import math
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, Response
from fastapi import Query as QueryParam
from pydantic import Field
from sqlalchemy import func
from sqlmodel import col, select

from service.api.deps import AdminDep, AnnotatorDep, SessionDep
from service.api.payloads import require_json
from service.auth import sees_pool
from service.crud import get_pool, label_value
from service.errors import (
    Forbidden,
    InvalidLabel,
    ItemNotFound,
    PoolNotFound,
    UnsupportedMediaType,
    responses,
)
from service.models import Item, Label, Pool, Query, Role, Task
from service.schemas import LabelCreate, LabelPublic, LabelsCreated, RowId

router = APIRouter(tags=["labels"])

LabelBatch = Annotated[list[LabelCreate], Field(min_length=1, max_length=10_000)]


def label_public(label: Label) -> LabelPublic:
    return LabelPublic(
        id=label.id,  # type: ignore[arg-type]
        item_id=label.item_id,
        pool_id=label.pool_id,
        value=label_value(label),
        annotator=label.annotator,
        round_id=label.round_id,
        created_at=label.created_at,
    )


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
) -> LabelsCreated:
    """Record one label or many; repeating an annotator's current label changes nothing.

    A label belongs to the round that queried the item (by default the latest such round).
    Labels on items no round queried are seed labels, which only admins may give. To a key
    restricted to some pools, items of other pools do not exist.
    """
    inputs = body if isinstance(body, list) else [body]
    item_ids = {i.item_id for i in inputs}
    items = {
        row.id: row
        for row in session.exec(
            select(Item.id, Item.pool_id, Pool.task, Pool.classes)
            .join(Pool, col(Pool.id) == col(Item.pool_id))
            .where(col(Item.id).in_(item_ids), sees_pool(session, key, col(Item.pool_id)))
        ).all()
    }
    missing = sorted(item_ids - items.keys())
    if missing:
        raise ItemNotFound(f"no items {missing}")
    queried: dict[int, set[int]] = {}
    for item_id, round_id in session.exec(
        select(Query.item_id, Query.round_id).where(col(Query.item_id).in_(item_ids))
    ):
        queried.setdefault(item_id, set()).add(round_id)

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

    # Each annotator's current label of these items, to make repeats no-ops.
    latest_ids = (
        select(func.max(Label.id))
        .where(
            col(Label.item_id).in_(item_ids),
            col(Label.annotator).in_({w[3] for w in wanted}),
        )
        .group_by(col(Label.item_id), col(Label.annotator))
    )
    current = {
        (label.item_id, label.annotator): label
        for label in session.exec(select(Label).where(col(Label.id).in_(latest_ids)))
    }
    results: list[Label] = []
    created: list[Label] = []
    for item_id, answer, round_id, annotator in wanted:
        label = current.get((item_id, annotator))
        if label is None or label_value(label) != answer:
            label = Label(
                pool_id=items[item_id].pool_id,
                item_id=item_id,
                value_class=answer if isinstance(answer, str) else None,
                value_number=answer if isinstance(answer, float) else None,
                annotator=annotator,
                round_id=round_id,
            )
            created.append(label)
            current[(item_id, annotator)] = label
        results.append(label)
    session.add_all(created)
    session.flush()
    return LabelsCreated(data=[label_public(label) for label in results], created=len(created))


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
