"""Plain functions that set up pools, labels and rounds as the API would, and read results."""

from typing import Any

import numpy as np
from sqlalchemy import func
from sqlmodel import Session, col, select

from service.blobs import FileBlobStore, blob_key
from service.datasets import packaged
from service.db import get_engine
from service.images import npy_bytes
from service.importing import import_dataset
from service.models import DualValue, Item, Label, ModelVersion, Pool, Query, Round, Split
from service.settings import settings
from service.strategies import COLD_START_SEEDING


def import_pool(
    dataset: str, size: int, holdout_fraction: float = 0.25, start: int = 0, **fields: Any
) -> tuple[Pool, dict[int, str | float]]:
    """A pool of `size` items of a packaged dataset from `start`, and its pool items' truth.

    The holdout split's labels are stored, as the import endpoint does; the truth of the pool
    split stays with the test, like an annotator's.
    """
    ds = packaged(dataset)["train"].subset(np.arange(start, start + size))
    answer = {
        blob_key(npy_bytes(x)): ds.classes[int(y)] if ds.classes else float(y)
        for x, y in zip(ds.x, ds.y, strict=True)
    }
    with Session(get_engine(), expire_on_commit=False) as session:
        count = session.exec(select(func.count()).select_from(Pool)).one()
        pool = Pool(
            name=f"{dataset}-{count + 1}",
            task=ds.task,
            classes=list(ds.classes) if ds.classes else None,
            target=ds.target,
            input_kind=ds.input_kind,
            **fields,
        )
        session.add(pool)
        session.flush()
        store = FileBlobStore(settings.blob_dir)
        import_dataset(
            session, store, pool, {"train": ds}, source=dataset, holdout_fraction=holdout_fraction
        )
        items = session.exec(
            select(Item.id, Item.sha256).where(Item.pool_id == pool.id, Item.split == Split.pool)
        ).all()
        session.commit()
    return pool, {item_id: answer[key] for item_id, key in items}


def label(pool: Pool, truth: dict[int, str | float], item_ids: list[int]) -> None:
    """An annotator's true answers for `item_ids`."""
    with Session(get_engine()) as session:
        session.add_all(
            Label(
                pool_id=pool.id,  # type: ignore[arg-type]
                item_id=item_id,
                value_class=truth[item_id] if isinstance(truth[item_id], str) else None,
                value_number=truth[item_id] if isinstance(truth[item_id], float) else None,
                annotator="oracle",
            )
            for item_id in item_ids
        )
        session.commit()


def add_round(
    pool: Pool, budget: int, labeled: int = 0, strategy: str = "ally", **fields: Any
) -> int:
    """A queued round, as POST /rounds commits it before enqueueing; cold when few labels."""
    with Session(get_engine()) as session:
        number = session.exec(select(func.count()).where(Round.pool_id == pool.id)).one() + 1
        round_ = Round(
            pool_id=pool.id,  # type: ignore[arg-type]
            number=number,
            strategy=strategy,
            budget=budget,
            seeding=COLD_START_SEEDING if labeled < settings.min_labeled else None,
            labeled_at_start=labeled,
            **fields,
        )
        session.add(round_)
        session.commit()
        return round_.id  # type: ignore[return-value]


def get_round(round_id: int) -> Round:
    with Session(get_engine()) as session:
        round_ = session.get(Round, round_id)
        assert round_ is not None
        return round_


def queries(round_id: int) -> list[tuple[int, int, float]]:
    """(rank, item id, score) of the round's queries, in rank order."""
    with Session(get_engine()) as session:
        return [
            (q.rank, q.item_id, q.score)
            for q in session.exec(
                select(Query).where(Query.round_id == round_id).order_by(col(Query.rank))
            )
        ]


def rows(table: type[DualValue] | type[ModelVersion], round_id: int) -> list[Any]:
    """Every row of `table` that belongs to the round."""
    with Session(get_engine()) as session:
        return list(session.exec(select(table).where(table.round_id == round_id)))


def pool_items(pool: Pool, split: Split) -> set[int]:
    with Session(get_engine()) as session:
        return set(
            session.exec(select(Item.id).where(Item.pool_id == pool.id, Item.split == split))
        )
