import logging
from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, func, select

from service import jobs
from service.api.deps import AdminDep, SessionDep
from service.api.payloads import require_json
from service.crud import get_pool, get_round, pool_counts
from service.errors import (
    BudgetTooLarge,
    InvalidParams,
    NotEnoughLabels,
    PoolNotFound,
    RoundInProgress,
    RoundNotCancellable,
    RoundNotFound,
    StrategyNotApplicable,
    UnsupportedMediaType,
    responses,
)
from service.models import ACTIVE_ROUND_STATUSES, Round, RoundStatus, utcnow
from service.schemas import RoundCreate, RoundPublic, RoundsPublic, RowId
from service.settings import settings
from service.strategies import (
    CLASSIFICATION_ONLY,
    COLD_START_SEEDING,
    PARAMS,
    accepted_params,
    supports,
)

router = APIRouter(tags=["rounds"])
log = logging.getLogger(__name__)


def round_public(round_: Round) -> RoundPublic:
    return RoundPublic(**round_.model_dump(), percent=round(100 * round_.progress, 1))


def strategy_params(
    strategy: str, params: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every parameter of `strategy`: those in `params` (checked against what the strategy
    accepts; the error lists the valid keys), else `defaults`, else the strategy's own.

    All are stored with the round, so it runs and reports the same setting even when a
    later release changes a default."""
    try:
        checked = PARAMS[strategy].model_validate(params)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in e.errors()
        )
        raise InvalidParams(
            f"invalid params for strategy {strategy!r} ({problems}); "
            f"it accepts: {accepted_params(strategy)}"
        ) from None
    unset = {k: v for k, v in (defaults or {}).items() if k not in checked.model_fields_set}
    return {**checked.model_dump(), **unset}


@router.post(
    "/rounds",
    status_code=202,
    response_model=RoundPublic,
    dependencies=[Depends(require_json)],
    responses=responses(
        PoolNotFound,
        StrategyNotApplicable,
        InvalidParams,
        NotEnoughLabels,
        BudgetTooLarge,
        RoundInProgress,
        UnsupportedMediaType,
    ),
)
def create_round(
    *, session: SessionDep, key: AdminDep, body: RoundCreate, response: Response
) -> RoundPublic:
    """Start a round: it is queued for a worker; follow it at the `Location` URL.

    With fewer labeled items than a round needs (`min_labeled`), the round starts cold:
    its items are picked by k-means coverage of the pool (`seeding`), unless
    `cold_start` is false, which makes it a 409.

    The round is committed, then sent to the workers through the broker. If the broker
    cannot be reached the answer is still 202: the round stays `queued`, and the workers,
    which sweep the database for queued rounds every `ALLY_ROUND_LEASE_SECONDS`, send it
    again once the broker is back (a few lease periods later).
    """
    pool = get_pool(session, body.pool_id)
    strategy = body.strategy or pool.default_strategy
    if not supports(strategy, pool.task):
        raise StrategyNotApplicable(
            f"strategy {strategy!r} works on classification pools only "
            f"({', '.join(sorted(CLASSIFICATION_ONLY))}); pool {pool.id} is a {pool.task} pool"
        )
    pool_defaults = (
        {"epsilon": pool.default_epsilon}
        if strategy == "ally" and pool.default_epsilon is not None
        else {}
    )
    params = strategy_params(strategy, body.params, pool_defaults)
    active = session.exec(
        select(Round.id).where(
            Round.pool_id == pool.id, col(Round.status).in_(ACTIVE_ROUND_STATUSES)
        )
    ).first()
    if active is not None:
        raise RoundInProgress(
            f"round {active} of pool {pool.id} is still queued or running; wait for it or cancel it"
        )
    counts = pool_counts(session, [body.pool_id])[body.pool_id]
    seeding = None
    if counts.labeled < settings.min_labeled:
        if not body.cold_start:
            raise NotEnoughLabels(
                f"strategy {strategy!r} needs at least {settings.min_labeled} labeled items; "
                f"pool {pool.id} has {counts.labeled}. Label more, or allow a cold start"
            )
        seeding = COLD_START_SEEDING
    budget = body.budget or pool.default_budget
    unlabeled = counts.items - counts.labeled
    if budget > unlabeled:
        raise BudgetTooLarge(
            f"budget {budget} exceeds the {unlabeled} unlabeled items of pool {pool.id}"
        )
    number = session.exec(
        select(func.coalesce(func.max(Round.number), 0)).where(Round.pool_id == pool.id)
    ).one()
    round_ = Round(
        pool_id=body.pool_id,
        number=number + 1,
        strategy=strategy,
        params=params,
        budget=budget,
        seed=body.seed,
        seeding=seeding,
        labeled_at_start=counts.labeled,
        created_by=key.name,
    )
    session.add(round_)
    try:
        session.flush()
    except IntegrityError:
        # Another request's round won the race (the one-active-round index, or the number);
        # the failed flush expired our objects, so name the pool from the request.
        raise RoundInProgress(
            f"another round of pool {body.pool_id} was just created; wait for it or cancel it"
        ) from None
    # The worker must find the row when the task arrives: commit before enqueueing.
    session.commit()
    try:
        jobs.enqueue_round(round_.id)  # type: ignore[arg-type]
    except jobs.BrokerUnreachable as error:
        # The database, not the broker, is the state of record: the round is queued, and
        # a worker's sweeper sends it once the broker answers again.
        log.warning("round %s is queued but the broker is unreachable: %s", round_.id, error)
    response.headers["Location"] = f"/rounds/{round_.id}"
    return round_public(round_)


@router.get("/rounds/{round_id}", response_model=RoundPublic, responses=responses(RoundNotFound))
def read_round(*, session: SessionDep, key: AdminDep, round_id: RowId) -> RoundPublic:
    """A round's status, phase, progress, timings, and its metrics once ready."""
    return round_public(get_round(session, round_id))


@router.get(
    "/pools/{pool_id}/rounds", response_model=RoundsPublic, responses=responses(PoolNotFound)
)
def read_pool_rounds(*, session: SessionDep, key: AdminDep, pool_id: RowId) -> RoundsPublic:
    """The pool's rounds, oldest first."""
    get_pool(session, pool_id)
    rounds = session.exec(
        select(Round).where(Round.pool_id == pool_id).order_by(col(Round.number))
    ).all()
    return RoundsPublic(data=[round_public(r) for r in rounds], count=len(rounds))


@router.post(
    "/rounds/{round_id}/cancel",
    response_model=RoundPublic,
    responses=responses(RoundNotFound, RoundNotCancellable),
)
def cancel_round(*, session: SessionDep, key: AdminDep, round_id: RowId) -> RoundPublic:
    """Cancel a queued or running round; its worker stops at the next checkpoint."""
    round_ = get_round(session, round_id)
    # Conditional, so a worker finishing the round at the same moment wins cleanly.
    cancelled = session.execute(
        update(Round)
        .where(col(Round.id) == round_id, col(Round.status).in_(ACTIVE_ROUND_STATUSES))
        .values(status=RoundStatus.cancelled, finished_at=utcnow())
    )
    if cancelled.rowcount == 0:  # type: ignore[attr-defined]
        raise RoundNotCancellable(
            f"round {round_id} is {round_.status}; only queued or running rounds can be cancelled"
        )
    session.refresh(round_)
    return round_public(round_)
