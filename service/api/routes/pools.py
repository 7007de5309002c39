from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from service.api.deps import AdminDep, SessionDep
from service.api.payloads import require_json
from service.crud import PoolCounts, get_pool, pool_counts
from service.errors import PoolNameTaken, PoolNotFound, UnsupportedMediaType, responses
from service.models import Pool
from service.schemas import MAX_INT, MAX_PAGE, PoolCreate, PoolPublic, PoolsPublic, RowId

router = APIRouter(prefix="/pools", tags=["pools"])


def pool_public(pool: Pool, counts: PoolCounts) -> PoolPublic:
    return PoolPublic(
        **pool.model_dump(),
        items=counts.items,
        labeled=counts.labeled,
        holdout=counts.holdout,
        rounds=counts.rounds,
    )


def _name_taken(session: Session, name: str) -> bool:
    return session.exec(select(Pool.id).where(Pool.name == name)).first() is not None


@router.post(
    "",
    status_code=201,
    response_model=PoolPublic,
    dependencies=[Depends(require_json)],
    responses=responses(PoolNameTaken, UnsupportedMediaType),
)
def create_pool(*, session: SessionDep, key: AdminDep, body: PoolCreate) -> PoolPublic:
    """Create a pool: its task, its classes or target, and the kind of items it holds."""
    if _name_taken(session, body.name):
        raise PoolNameTaken(f"a pool named {body.name!r} already exists")
    values = body.model_dump(mode="json")
    values["model_spec"] = body.model_spec.model_dump(mode="json", exclude_none=True)
    pool = Pool.model_validate(values)
    session.add(pool)
    try:
        session.flush()
    except IntegrityError:
        # Another request took the name between our check and our insert.
        raise PoolNameTaken(f"a pool named {body.name!r} already exists") from None
    return pool_public(pool, PoolCounts())


@router.get("", response_model=PoolsPublic, responses=responses())
def read_pools(
    *,
    session: SessionDep,
    key: AdminDep,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> PoolsPublic:
    """List pools with their item, label and round counts."""
    total = session.exec(select(func.count()).select_from(Pool)).one()
    pools = session.exec(select(Pool).order_by(col(Pool.id)).offset(offset).limit(limit)).all()
    counts = pool_counts(session, [pool.id for pool in pools if pool.id is not None])
    return PoolsPublic(data=[pool_public(p, counts[p.id]) for p in pools], count=total)  # type: ignore[index]


@router.get("/{pool_id}", response_model=PoolPublic, responses=responses(PoolNotFound))
def read_pool(*, session: SessionDep, key: AdminDep, pool_id: RowId) -> PoolPublic:
    """One pool with its counts of items, labeled items, holdout items and rounds."""
    pool = get_pool(session, pool_id)
    return pool_public(pool, pool_counts(session, [pool_id])[pool_id])
