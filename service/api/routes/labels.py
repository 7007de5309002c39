import csv
import io
import json
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, Response
from fastapi import Query as QueryParam
from pydantic import Field
from sqlalchemy import func
from sqlmodel import col, select

from service.api.deps import AdminDep, AnnotatorDep, LabelWriterDep, SessionDep
from service.api.payloads import require_json
from service.api.responses import model_json
from service.crud import get_pool, label_value
from service.errors import InvalidLabel, ItemNotFound, PoolNotFound, UnsupportedMediaType, responses
from service.labels import LabelRequest
from service.models import Item, Label
from service.schemas import LabelCreate, LabelsCreated, RowId

router = APIRouter(tags=["labels"])

LabelBatch = Annotated[list[LabelCreate], Field(min_length=1, max_length=10_000)]


@router.post(
    "/labels",
    response_model=LabelsCreated,
    dependencies=[Depends(require_json)],
    responses=responses(ItemNotFound, InvalidLabel, UnsupportedMediaType),
)
async def create_labels(
    *,
    key: AnnotatorDep,
    writer: LabelWriterDep,
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
    # Written with the requests that arrive meanwhile, in one statement (PostgreSQL) or one
    # transaction (SQLite): all of this request's labels or none.
    return model_json(await writer.submit(LabelRequest(key, inputs)))


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
