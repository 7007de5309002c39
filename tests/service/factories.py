"""Plain functions that put rows in the test database, as the API or the worker would."""

import io
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import Engine, event, func
from sqlmodel import Session, SQLModel, select

from service.blobs import BlobStore, FileBlobStore
from service.images import npy_bytes
from service.models import (
    BlobFormat,
    InputKind,
    Item,
    Label,
    Pool,
    Query,
    Round,
    RoundStatus,
    Split,
    Task,
)

DIGITS = [str(d) for d in range(10)]


def image_bytes(
    seed: int = 0, size: tuple[int, int] = (8, 6), format: str = "PNG", *, grey: bool = False
) -> bytes:
    """A small random RGB (or grey) image; different seeds give different bytes."""
    shape = (size[1], size[0]) if grey else (size[1], size[0], 3)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A valid PNG header declaring 12000x12000 pixels, with almost no data behind it."""
    buffer = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(buffer, format="PNG")
    return buffer.getvalue()


def stored_blobs(blobs: FileBlobStore) -> int:
    """Files in the blob store: compare before and after a refused upload."""
    return sum(1 for p in blobs.root.rglob("*") if p.is_file()) if blobs.root.exists() else 0


def make_pool(session: Session, **fields: Any) -> Pool:
    values: dict[str, Any] = {
        "name": f"pool-{session.exec(select(func.count()).select_from(Pool)).one() + 1}",
        "task": Task.classification,
        "classes": DIGITS,
        "input_kind": InputKind.image,
    }
    values.update(fields)
    if values["task"] == Task.regression and "classes" not in fields:
        values["classes"] = None
    pool = Pool(**values)
    session.add(pool)
    session.flush()
    return pool


def make_items(
    session: Session,
    blobs: BlobStore,
    pool: Pool,
    n: int,
    *,
    split: Split = Split.pool,
    start: int = 0,
) -> list[Item]:
    """`n` items: 8x8 grey array images, or 4-vectors, for the pool's input kind."""
    rng = np.random.default_rng(1000 + start)
    items = []
    for _ in range(n):
        if pool.input_kind == InputKind.image:
            x = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        else:
            x = rng.normal(size=4).astype(np.float32)
        key = blobs.put(npy_bytes(x))
        items.append(
            Item(
                pool_id=pool.id,  # type: ignore[arg-type]
                sha256=key,
                format=BlobFormat.npy,
                kind=pool.input_kind,
                shape=list(x.shape),
                dtype=str(x.dtype),
                split=split,
            )
        )
    session.add_all(items)
    session.flush()
    return items


def make_label(
    session: Session,
    item: Item,
    value: str | float,
    *,
    annotator: str = "seed",
    round_id: int | None = None,
) -> Label:
    label = Label(
        pool_id=item.pool_id,
        item_id=item.id,  # type: ignore[arg-type]
        value_class=value if isinstance(value, str) else None,
        value_number=value if isinstance(value, float) else None,
        annotator=annotator,
        round_id=round_id,
    )
    session.add(label)
    session.flush()
    return label


def make_round(
    session: Session,
    pool: Pool,
    *,
    status: RoundStatus = RoundStatus.ready,
    queried: list[Item] = (),  # type: ignore[assignment]
    metrics: dict[str, Any] | None = None,
    strategy: str = "ally",
    labeled_at_start: int = 0,
) -> Round:
    """A round as the worker leaves it: with `queried` as its queries, best first."""
    number = session.exec(select(func.count()).where(Round.pool_id == pool.id)).one() + 1
    round_ = Round(
        pool_id=pool.id,  # type: ignore[arg-type]
        number=number,
        strategy=strategy,
        budget=max(len(queried), 1),
        status=status,
        metrics=metrics,
        labeled_at_start=labeled_at_start,
    )
    session.add(round_)
    session.flush()
    session.add_all(
        Query(
            round_id=round_.id,  # type: ignore[arg-type]
            item_id=item.id,  # type: ignore[arg-type]
            rank=rank,
            score=1.0 - rank / 100,
            cluster=rank % 3,
        )
        for rank, item in enumerate(queried)
    )
    session.flush()
    return round_


def row_counts(session: Session) -> dict[str, int]:
    """Rows in every table: compare before and after a refused request."""
    session.expire_all()
    return {
        name: session.exec(select(func.count()).select_from(table)).one()
        for name, table in SQLModel.metadata.tables.items()
    }


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements run on `engine` inside the block (savepoints and rollbacks, which
    the test transaction adds, left out)."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not statement.startswith(("SAVEPOINT", "RELEASE", "ROLLBACK")):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@asynccontextmanager
async def serving(app: FastAPI, key: str) -> AsyncIterator[httpx.AsyncClient]:
    """`app` started (its lifespan: migrations, label writer, listener) and a client with `key`."""
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=transport, base_url="http://test", headers={"Authorization": f"Bearer {key}"}
        ) as client,
    ):
        yield client
