"""The data layer: SQLModel tables shared by the API and the workers (no FastAPI, no torch).

Every schema change goes through an Alembic migration in `service/migrations/versions`.
"""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, Index, String, UniqueConstraint, false, text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

# Stable constraint names, so migrations can refer to them on every database.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use service.models.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class EpsilonText(TypeDecorator[float | str]):
    """A constraint level: a number, or "auto"; stored as text so both fit one column."""

    impl = String(32)  # the longest float repr, "2.2250738585072014e-308", has 23 characters
    cache_ok = True

    def process_bind_param(self, value: float | str | None, dialect: Dialect) -> str | None:
        return None if value is None else "auto" if value == "auto" else repr(float(value))

    def process_result_value(self, value: str | None, dialect: Dialect) -> float | str | None:
        return None if value is None else "auto" if value == "auto" else float(value)


class Task(StrEnum):
    classification = "classification"
    regression = "regression"


class InputKind(StrEnum):
    image = "image"
    vector = "vector"


class Split(StrEnum):
    pool = "pool"  # candidates for querying and labeling
    holdout = "holdout"  # the evaluation set: never queried, its labels give the metrics


class BlobFormat(StrEnum):
    png = "png"
    jpeg = "jpeg"
    npy = "npy"  # a numpy array: a vector, or an image imported from arrays


class RoundStatus(StrEnum):
    queued = "queued"
    running = "running"
    ready = "ready"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_ROUND_STATUSES = (RoundStatus.queued, RoundStatus.running)
ACTIVE_ROUND_SQL = "status IN ('queued', 'running')"


class Role(StrEnum):
    admin = "admin"
    annotator = "annotator"


class Pool(SQLModel, table=True):
    __tablename__ = "pools"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100, unique=True)
    task: str = Field(sa_type=String(20))  # Task
    # Class names in label-index order; None for regression.
    classes: list[str] | None = Field(default=None, sa_type=JSON)
    # What a regression target measures, e.g. "total UPDRS".
    target: str | None = Field(default=None, max_length=200)
    input_kind: str = Field(sa_type=String(20))  # InputKind
    # Network and training options for the worker (schemas.ModelSpec), e.g. {"network": "mlp"}.
    model_spec: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    default_strategy: str = Field(default="ally", max_length=40)
    default_budget: int = 100
    # ALLY's constraint level for rounds that give none: a number or "auto"; None: the
    # strategy's own default.
    default_epsilon: float | str | None = Field(default=None, sa_type=EpsilonText)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Item(SQLModel, table=True):
    """One unit to label; its bytes live in the blob store under `sha256`."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("pool_id", "sha256"),
        # The worker reads a whole pool (or its holdout) in one query.
        Index("ix_items_pool_id_split", "pool_id", "split"),
    )

    id: int | None = Field(default=None, primary_key=True)
    pool_id: int = Field(foreign_key="pools.id")
    sha256: str = Field(max_length=64)  # content hash, also the blob key
    format: str = Field(sa_type=String(10))  # BlobFormat
    kind: str = Field(sa_type=String(20))  # InputKind
    shape: list[int] = Field(sa_type=JSON)  # [H, W], [H, W, C] or [D]
    dtype: str = Field(default="uint8", max_length=20)
    split: str = Field(default=Split.pool.value, sa_type=String(20))  # Split
    meta: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Label(SQLModel, table=True):
    """One answer about an item; the history is kept and the latest one counts."""

    __tablename__ = "labels"
    # An annotator's latest label of an item: one index descent (migration 0009).
    __table_args__ = (Index("ix_labels_item_id_annotator_id", "item_id", "annotator", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    pool_id: int = Field(foreign_key="pools.id", index=True)
    item_id: int = Field(foreign_key="items.id")
    # Exactly one of the two is set: a class name, or a finite regression target.
    value_class: str | None = Field(default=None, max_length=200)
    value_number: float | None = None
    annotator: str = Field(max_length=100)
    # None: a seed label given outside any round (admins, imports).
    round_id: int | None = Field(default=None, foreign_key="rounds.id")
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Round(SQLModel, table=True):
    """One query round: what the worker must run, and how far it got."""

    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("pool_id", "number"),
        # One queued or running round per pool, even when two requests race.
        Index(
            "ux_rounds_pool_id_active",
            "pool_id",
            unique=True,
            sqlite_where=text(ACTIVE_ROUND_SQL),
            postgresql_where=text(ACTIVE_ROUND_SQL),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    pool_id: int = Field(foreign_key="pools.id")
    number: int  # 1, 2, ... within the pool
    strategy: str = Field(max_length=40)
    params: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # epsilon, k, ...
    budget: int
    seed: int = 0
    # Set on a cold-start round: how the first items are picked without a model.
    seeding: str | None = Field(default=None, max_length=40)
    labeled_at_start: int = 0
    created_by: str = Field(default="", max_length=100)

    status: str = Field(default=RoundStatus.queued.value, sa_type=String(20), index=True)
    phase: str | None = Field(default=None, max_length=40)
    progress: float = 0.0  # 0..1
    eta_seconds: float | None = None
    timings: dict[str, float] = Field(default_factory=dict, sa_type=JSON)  # phase -> seconds
    error: str | None = None
    metrics: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)

    # Workers claim a round with a conditional UPDATE and keep the lease alive.
    attempts: int = 0
    claimed_by: str | None = Field(default=None, max_length=200)
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Query(SQLModel, table=True):
    """An item a round asks to label, with its rank and an optional annotator lease."""

    __tablename__ = "queries"
    __table_args__ = (
        UniqueConstraint("round_id", "item_id"),
        Index("ix_queries_round_id_rank", "round_id", "rank"),
    )

    id: int | None = Field(default=None, primary_key=True)
    round_id: int = Field(foreign_key="rounds.id")
    item_id: int = Field(foreign_key="items.id", index=True)
    rank: int  # 0 = most informative
    score: float
    cluster: int | None = None
    leased_to: str | None = Field(default=None, max_length=100)
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ModelVersion(SQLModel, table=True):
    """The network a round trained, as a checkpoint blob."""

    __tablename__ = "model_versions"

    id: int | None = Field(default=None, primary_key=True)
    round_id: int = Field(foreign_key="rounds.id", unique=True)
    checkpoint: str = Field(max_length=64)  # blob key
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DualValue(SQLModel, table=True):
    """A dual variable of a round: measured on a labeled item, or predicted for a pool item."""

    __tablename__ = "dual_values"
    __table_args__ = (UniqueConstraint("round_id", "item_id"),)

    id: int | None = Field(default=None, primary_key=True)
    round_id: int = Field(foreign_key="rounds.id")
    item_id: int = Field(foreign_key="items.id")
    value: float
    measured: bool  # True: the final PDCL dual of a labeled item; False: predicted


class ApiKey(SQLModel, table=True):
    """An API key; only its sha256 is stored, the key itself is shown once."""

    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100)
    role: str = Field(sa_type=String(20))  # Role
    key_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16)  # the key's first characters, to recognise it
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # True: the key sees only the pools in api_key_pools (none, should its rows be lost).
    restricted: bool = Field(default=False, sa_column_kwargs={"server_default": false()})


class ApiKeyPool(SQLModel, table=True):
    """A pool a restricted annotator key may see."""

    __tablename__ = "api_key_pools"

    # The primary key (key_id, pool_id) is the index that reading a key's pools uses: once per
    # API process and key (service/auth.py caches them), and for GET /keys.
    key_id: int = Field(foreign_key="api_keys.id", primary_key=True)
    pool_id: int = Field(foreign_key="pools.id", primary_key=True)


__all__ = [
    "ACTIVE_ROUND_STATUSES",
    "ApiKey",
    "ApiKeyPool",
    "BlobFormat",
    "DualValue",
    "InputKind",
    "Item",
    "Label",
    "ModelVersion",
    "Pool",
    "Query",
    "Role",
    "Round",
    "RoundStatus",
    "Split",
    "Task",
    "utcnow",
]
