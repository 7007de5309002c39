"""Database helpers shared by the routes and the CLI. They flush, never commit."""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, distinct, func
from sqlmodel import Session, col, select

from service.auth import Caller, sees_pool
from service.errors import ItemNotFound, PoolNotFound, RoundNotFound, ShapeMismatch
from service.models import Item, Label, Pool, Round, Split


def get_pool(session: Session, pool_id: int) -> Pool:
    pool = session.get(Pool, pool_id)
    if pool is None:
        raise PoolNotFound(f"no pool {pool_id}")
    return pool


def get_item(session: Session, item_id: int, *, seen_by: Caller) -> Item:
    """The item, if it exists and `seen_by` may see its pool (else the same 404)."""
    item = session.exec(
        select(Item).where(Item.id == item_id, sees_pool(seen_by, col(Item.pool_id)))
    ).first()
    if item is None:
        raise ItemNotFound(f"no item {item_id}")
    return item


def get_round(session: Session, round_id: int) -> Round:
    round_ = session.get(Round, round_id)
    if round_ is None:
        raise RoundNotFound(f"no round {round_id}")
    return round_


def check_shapes(session: Session, pool: Pool, shapes: Iterable[tuple[str, list[int]]]) -> None:
    """Refuse new items (name, shape) unless all have the shape of the pool's items.

    The worker stacks a pool's items into one array, so the pool's first items fix its shape.
    """
    expected = session.exec(
        select(Item.shape).where(Item.pool_id == pool.id).order_by(col(Item.id)).limit(1)
    ).first()
    where = f"pool {pool.id} holds items of shape {expected}"
    for name, shape in shapes:
        if expected is None:
            expected, where = list(shape), f"the first new item has shape {list(shape)}"
        elif list(shape) != list(expected):
            raise ShapeMismatch(f"{name} has shape {list(shape)}; {where}")


@dataclass
class PoolCounts:
    items: int = 0
    holdout: int = 0
    labeled: int = 0
    rounds: int = 0


def pool_counts(session: Session, pool_ids: list[int]) -> dict[int, PoolCounts]:
    """Item, holdout, labeled and round counts of each pool, in three grouped queries."""
    counts = {pool_id: PoolCounts() for pool_id in pool_ids}
    if not pool_ids:
        return counts
    by_split = session.exec(
        select(Item.pool_id, Item.split, func.count())
        .where(col(Item.pool_id).in_(pool_ids))
        .group_by(col(Item.pool_id), col(Item.split))
    )
    for pool_id, split, n in by_split:
        if split == Split.pool:
            counts[pool_id].items = n
        else:
            counts[pool_id].holdout = n
    labeled = session.exec(
        select(Label.pool_id, func.count(distinct(Label.item_id)))
        .join(Item, col(Item.id) == col(Label.item_id))
        .where(col(Label.pool_id).in_(pool_ids), col(Item.split) == Split.pool)
        .group_by(col(Label.pool_id))
    )
    for pool_id, n in labeled:
        counts[pool_id].labeled = n
    rounds = session.exec(
        select(Round.pool_id, func.count())
        .where(col(Round.pool_id).in_(pool_ids))
        .group_by(col(Round.pool_id))
    )
    for pool_id, n in rounds:
        counts[pool_id].rounds = n
    return counts


def label_value(label: Label | Row[Any]) -> str | float:
    """A label's answer: its class name or its number (a Label, or a row with both columns)."""
    if label.value_class is not None:
        return label.value_class
    assert label.value_number is not None
    return label.value_number
