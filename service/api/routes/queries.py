from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Query as QueryParam
from sqlalchemy import and_, exists, func, or_, update
from sqlmodel import col, select

from service.api.deps import AnnotatorDep, SessionDep
from service.auth import sees_pool
from service.errors import RoundNotFound, RoundNotReady, responses
from service.models import InputKind, Label, Pool, Query, Round, RoundStatus, utcnow
from service.schemas import MAX_INT, MAX_PAGE, Name, QueriesPage, QueryPublic, RowId
from service.settings import settings

router = APIRouter(tags=["queries"])

_labeled = exists().where(col(Label.item_id) == col(Query.item_id))


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
) -> QueriesPage:
    """The items a round asks to label, best first, each with its image URL, score and cluster.

    Without `annotator`: a page of all the round's queries. With it: up to `limit` unlabeled
    items leased to that annotator (renewing the leases it already holds).
    """
    found = session.exec(
        select(Round.status, Round.pool_id, Pool.task, Pool.classes, Pool.input_kind)
        .join(Pool, col(Pool.id) == col(Round.pool_id))
        .where(Round.id == round_id, sees_pool(session, key, col(Round.pool_id)))
    ).first()
    if found is None:
        raise RoundNotFound(f"no round {round_id}")
    status, pool_id, task, classes, input_kind = found
    if status != RoundStatus.ready:
        raise RoundNotReady(f"round {round_id} is {status}; its queries exist once it is ready")

    rows = select(
        Query.item_id,
        Query.rank,
        Query.score,
        Query.cluster,
        Query.leased_to,
        Query.lease_until,
        _labeled.label("labeled"),
    ).where(Query.round_id == round_id)
    if annotator is None:
        count = session.exec(
            select(func.count()).select_from(Query).where(Query.round_id == round_id)
        ).one()
        rows = rows.order_by(col(Query.rank)).offset(offset).limit(limit)
    else:
        now = utcnow()
        leasable = (
            select(Query.id)
            .where(
                Query.round_id == round_id,
                ~_labeled,
                or_(
                    col(Query.leased_to).is_(None),
                    col(Query.leased_to) == annotator,
                    col(Query.lease_until) < now,
                ),
            )
            .order_by(col(Query.rank))
            .limit(limit)
            # Postgres: concurrent annotators skip each other's rows instead of waiting.
            .with_for_update(skip_locked=True)
        )
        session.execute(
            update(Query)
            .where(col(Query.id).in_(leasable.scalar_subquery()))
            .values(
                leased_to=annotator, lease_until=now + timedelta(seconds=settings.lease_seconds)
            )
            .execution_options(synchronize_session=False)
        )
        mine = and_(col(Query.leased_to) == annotator, col(Query.lease_until) > now, ~_labeled)
        rows = rows.where(mine).order_by(col(Query.rank)).limit(limit)
        count = None
        offset = 0

    base = f"{request.base_url}items/"
    images = input_kind == InputKind.image
    data = [
        QueryPublic(
            item_id=row.item_id,
            rank=row.rank,
            score=row.score,
            cluster=row.cluster,
            image_url=f"{base}{row.item_id}/image" if images else None,
            labeled=row.labeled,
            leased_to=row.leased_to,
            lease_until=row.lease_until,
        )
        for row in session.exec(rows).all()
    ]
    return QueriesPage(
        round_id=round_id,
        pool_id=pool_id,
        task=task,
        classes=classes,
        data=data,
        count=len(data) if count is None else count,
        offset=offset,
        limit=limit,
    )
