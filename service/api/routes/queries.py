from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi import Query as QueryParam
from sqlalchemy import and_, bindparam, exists, func, or_, update
from sqlmodel import col, select

from service.api.deps import AnnotatorDep, SessionDep
from service.api.responses import model_json
from service.auth import PoolScoped
from service.errors import RoundNotFound, RoundNotReady, responses
from service.models import InputKind, Label, Pool, Query, Round, RoundStatus, utcnow
from service.schemas import MAX_INT, MAX_PAGE, Name, QueriesPage, RowId
from service.settings import settings

router = APIRouter(tags=["queries"])

# The statements of this hot route are built once and run with bound parameters: building
# one per request costs more than running it.
_labeled = exists().where(col(Label.item_id) == col(Query.item_id))
_ROUND = PoolScoped(
    select(
        Round.status,
        Round.pool_id,
        Pool.task,
        Pool.classes,
        Pool.input_kind,
        select(func.count()).where(Query.round_id == Round.id).scalar_subquery(),
    )
    .join(Pool, col(Pool.id) == col(Round.pool_id))
    .where(Round.id == bindparam("round_id")),
    col(Round.pool_id),
)
_QUERIES = select(
    Query.item_id,
    Query.rank,
    Query.score,
    Query.cluster,
    Query.leased_to,
    Query.lease_until,
    _labeled.label("labeled"),
).where(Query.round_id == bindparam("round_id"))
_PAGE = _QUERIES.order_by(col(Query.rank)).offset(bindparam("offset")).limit(bindparam("limit"))
_LEASE = (
    update(Query)
    .where(
        col(Query.id).in_(
            select(Query.id)
            .where(
                # Not "round_id": an UPDATE keeps column names for its own parameters.
                Query.round_id == bindparam("in_round"),
                ~_labeled,
                or_(
                    col(Query.leased_to).is_(None),
                    col(Query.leased_to) == bindparam("annotator"),
                    col(Query.lease_until) < bindparam("now"),
                ),
            )
            .order_by(col(Query.rank))
            .limit(bindparam("limit"))
            # Postgres: concurrent annotators skip each other's rows instead of waiting.
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(leased_to=bindparam("annotator"), lease_until=bindparam("lease_end"))
    .execution_options(synchronize_session=False)
)
_LEASED = (
    _QUERIES.where(
        and_(
            col(Query.leased_to) == bindparam("annotator"),
            col(Query.lease_until) > bindparam("now"),
            ~_labeled,
        )
    )
    .order_by(col(Query.rank))
    .limit(bindparam("limit"))
)


@router.get(
    "/queries/{round_id}",
    response_model=QueriesPage,
    responses=responses(RoundNotFound, RoundNotReady),
)
def read_queries(
    *,
    request: Request,
    session: SessionDep,
    key: AnnotatorDep,
    round_id: RowId,
    annotator: Annotated[
        Name | None,
        QueryParam(
            description="Lease unlabeled items to this annotator, so that concurrent "
            "annotators get disjoint work; leases expire after `lease_seconds`."
        ),
    ] = None,
    offset: Annotated[int, QueryParam(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, QueryParam(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """The items a round asks to label, best first, each with its image URL, score and cluster.

    Without `annotator`: a page of all the round's queries. With it: up to `limit` unlabeled
    items leased to that annotator (renewing the leases it already holds).
    """
    # Core rather than ORM execution: these are plain rows, and the ORM's row handling
    # costs more than the query.
    connection = session.connection()
    statement, access = _ROUND.for_caller(key)
    found = connection.execute(statement, {"round_id": round_id, **access}).first()
    if found is None:
        raise RoundNotFound(f"no round {round_id}")
    status, pool_id, task, classes, input_kind, count = found
    if status != RoundStatus.ready:
        raise RoundNotReady(f"round {round_id} is {status}; its queries exist once it is ready")

    if annotator is None:
        rows = connection.execute(
            _PAGE, {"round_id": round_id, "offset": offset, "limit": limit}
        ).all()
    else:
        now = utcnow()
        leases = {"round_id": round_id, "annotator": annotator, "now": now, "limit": limit}
        end = now + timedelta(seconds=settings.lease_seconds)
        session.execute(_LEASE, {**leases, "in_round": round_id, "lease_end": end})
        rows = connection.execute(_LEASED, leases).all()
        count = len(rows)
        offset = 0

    base = f"{request.base_url}items/"
    images = input_kind == InputKind.image
    # Plain dicts, validated in one call to pydantic's core: faster than a model per row.
    page = QueriesPage.model_validate(
        {
            "round_id": round_id,
            "pool_id": pool_id,
            "task": task,
            "classes": classes,
            "data": [
                {
                    "item_id": item_id,
                    "rank": rank,
                    "score": score,
                    "cluster": cluster,
                    "image_url": f"{base}{item_id}/image" if images else None,
                    "labeled": labeled,
                    "leased_to": leased_to,
                    "lease_until": lease_until,
                }
                for item_id, rank, score, cluster, leased_to, lease_until, labeled in rows
            ],
            "count": count,
            "offset": offset,
            "limit": limit,
        }
    )
    return model_json(page)
