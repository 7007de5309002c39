from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi import Query as QueryParam
from sqlalchemy import Connection, Row, and_, bindparam, exists, func, or_, update
from sqlmodel import Session, col, select

from service.api.deps import AnnotatorDep, DatabaseDep
from service.api.responses import json_response
from service.auth import Caller
from service.errors import RoundNotFound, RoundNotReady, responses
from service.models import InputKind, Label, Pool, Query, Round, RoundStatus, utcnow
from service.page_cache import PageCache
from service.schemas import MAX_INT, MAX_PAGE, Name, QueriesPage, RowId
from service.settings import settings

router = APIRouter(tags=["queries"])

# The statements of this hot route are built once and run with bound parameters: building
# one per request costs more than running it.
_labeled = exists().where(col(Label.item_id) == col(Query.item_id))
_ROUND = (
    select(
        Round.id.label("round_id"),  # type: ignore[union-attr]
        Round.status,
        Round.pool_id,
        Pool.task,
        Pool.classes,
        Pool.input_kind,
        select(func.count()).where(Query.round_id == Round.id).scalar_subquery().label("count"),
    )
    .join(Pool, col(Pool.id) == col(Round.pool_id))
    .where(Round.id == bindparam("round_id"))
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
async def read_queries(
    *,
    request: Request,
    database: DatabaseDep,
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
    base_url = str(request.base_url)
    # On PostgreSQL pages are kept until a label or a lease changes them (page_cache.py).
    pages: PageCache = request.app.state.pages
    if annotator is not None:
        leased = await database.run(_leased_page, key, round_id, annotator, limit, base_url)
        pages.changed([round_id])  # the leases are committed: this process's pages show them
        return leased
    wanted = (offset, limit, base_url)
    kept = pages.get(round_id, wanted)
    if kept is None:
        version = pages.version()
        kept = await database.run(_page, key, round_id, offset, limit, base_url)
        pages.put(round_id, wanted, kept, version)
    else:
        _check_visible(key, round_id, pool_id=kept[0])
    return json_response(kept[1])


def _page(
    session: Session, key: Caller, round_id: int, offset: int, limit: int, base_url: str
) -> tuple[int, bytes]:
    """The round's pool and a page of its queries, as JSON."""
    # Core rather than ORM execution: these are plain rows, and the ORM's row handling
    # costs more than the query.
    connection = session.connection()
    found = _ready_round(connection, key, round_id)
    rows = connection.execute(_PAGE, {"round_id": round_id, "offset": offset, "limit": limit})
    return found.pool_id, _render(found, rows.all(), found.count, offset, limit, base_url)


def _leased_page(
    session: Session, key: Caller, round_id: int, annotator: str, limit: int, base_url: str
) -> Response:
    """Up to `limit` of the round's unlabeled queries, leased to `annotator`."""
    connection = session.connection()
    found = _ready_round(connection, key, round_id)
    now = utcnow()
    leases = {"round_id": round_id, "annotator": annotator, "now": now, "limit": limit}
    end = now + timedelta(seconds=settings.lease_seconds)
    connection.execute(_LEASE, {**leases, "in_round": round_id, "lease_end": end})
    rows = connection.execute(_LEASED, leases).all()
    return json_response(_render(found, rows, len(rows), 0, limit, base_url))


def _ready_round(connection: Connection, key: Caller, round_id: int) -> Row[Any]:
    """The round (_ROUND's columns); 404 when `key` cannot see it, 409 when not ready."""
    found = connection.execute(_ROUND, {"round_id": round_id}).first()
    if found is None:
        raise RoundNotFound(f"no round {round_id}")
    _check_visible(key, round_id, found.pool_id)
    if found.status != RoundStatus.ready:
        raise RoundNotReady(
            f"round {round_id} is {found.status}; its queries exist once it is ready"
        )
    return found


def _check_visible(key: Caller, round_id: int, pool_id: int) -> None:
    # To a key restricted to some pools, the rounds of the others do not exist.
    if key.pools is not None and pool_id not in key.pools:
        raise RoundNotFound(f"no round {round_id}")


def _render(
    found: Row[Any], rows: list[Row[Any]], count: int, offset: int, limit: int, base_url: str
) -> bytes:
    """The page's JSON (QueriesPage)."""
    images = f"{base_url}items/" if found.input_kind == InputKind.image else None
    # Plain dicts, validated in one call to pydantic's core: faster than a model per row.
    page = QueriesPage.model_validate(
        {
            "round_id": found.round_id,
            "pool_id": found.pool_id,
            "task": found.task,
            "classes": found.classes,
            "data": [
                {
                    "item_id": item_id,
                    "rank": rank,
                    "score": score,
                    "cluster": cluster,
                    "image_url": f"{images}{item_id}/image" if images else None,
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
    return page.model_dump_json().encode()
