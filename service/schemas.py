"""Request and response bodies of the HTTP API (pydantic; no FastAPI, no database)."""

import math
import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    Strict,
    StrictStr,
    StringConstraints,
    model_validator,
)

from service.datasets import PACKAGED
from service.models import InputKind, Role, RoundStatus, Split, Task
from service.strategies import (
    CLASSIFICATION_ONLY,
    PARAMS,
    Epsilon,
    StrategyName,
    accepted_params,
    supports,
)


def _printable(value: str) -> str:
    """Refuse control characters (newlines, tabs, NUL...): names end up in headers and files."""
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("must not contain control characters")
    return value


Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    AfterValidator(_printable),
]
ClassName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(_printable),
]
Description = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=200), AfterValidator(_printable)
]
MAX_PAGE = 500
# Ids, budgets and seeds are INTEGER columns, 32 bits on PostgreSQL: a larger number is
# invalid input (422) rather than a database error (500).
MAX_INT = 2**31 - 1
RowId = Annotated[int, Field(ge=1, le=MAX_INT)]
Budget = Annotated[int, Field(ge=1, le=MAX_INT)]
Seed = Annotated[int, Field(ge=0, le=MAX_INT)]


def _finite(value: Any) -> Any:
    """Refuse NaN and infinities anywhere inside: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    if isinstance(value, dict):
        for item in value.values():
            _finite(item)
    elif isinstance(value, list):
        for item in value:
            _finite(item)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_finite)]


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


# --- pools -----------------------------------------------------------------------------


class TrainingSpec(BaseModel):
    """Training options: the JSON-able fields of the worker's PDCLConfig (unset: its default)."""

    model_config = ConfigDict(extra="forbid")

    max_epochs: int | None = Field(default=None, ge=1, le=10_000)
    batch_size: int | None = Field(default=None, ge=1)
    primal_lr: FiniteFloat | None = Field(default=None, gt=0)
    primal_lr_decay: FiniteFloat | None = Field(default=None, gt=0, le=1)
    primal_steps: int | None = Field(default=None, ge=1)
    weight_decay: FiniteFloat | None = Field(default=None, ge=0)
    dual_lr: FiniteFloat | None = Field(default=None, ge=0)
    dual_lr_power: FiniteFloat | None = Field(default=None, ge=0)
    lambda_init: FiniteFloat | None = Field(default=None, ge=0)
    epsilon_scale: FiniteFloat | None = Field(
        default=None, gt=0, description="c in epsilon = c * p_u when epsilon is 'auto'."
    )
    holdout_fraction: FiniteFloat | None = Field(default=None, ge=0, lt=1)
    patience: int | None = Field(default=None, ge=1)
    target_accuracy: FiniteFloat | None = Field(default=None, gt=0, le=1)


class ModelSpec(BaseModel):
    """The network and training options a round of this pool uses."""

    model_config = ConfigDict(extra="forbid")

    network: Literal["auto", "mlp", "resnet18"] = Field(
        default="auto", description="auto: ResNet-18 for colour images, else the MLP."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec)


class PoolCreate(BaseModel):
    model_config = _examples(
        {
            "name": "mnist",
            "task": "classification",
            "classes": [str(d) for d in range(10)],
            "input_kind": "image",
            "model_spec": {"network": "mlp"},
            "default_strategy": "ally",
            "default_budget": 100,
        },
        {
            "name": "parkinsons",
            "task": "regression",
            "target": "total UPDRS",
            "input_kind": "vector",
        },
    )

    name: Name
    task: Task
    classes: list[ClassName] | None = Field(
        default=None, description="Class names, required for classification, in label order."
    )
    target: Description | None = Field(
        default=None, description="What a regression target measures."
    )
    input_kind: InputKind
    model_spec: ModelSpec = Field(default_factory=ModelSpec, description="Options for training.")
    default_strategy: StrategyName = "ally"
    default_budget: Budget = 100
    default_epsilon: Epsilon | None = Field(
        default=None, description="ALLY's constraint level when a round gives none, or 'auto'."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "PoolCreate":
        if self.task == Task.classification:
            if not self.classes or len(self.classes) < 2:
                raise ValueError("a classification pool needs at least two class names")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("class names must be distinct")
        elif self.classes is not None:
            raise ValueError("a regression pool has no classes; describe it with 'target'")
        if not supports(self.default_strategy, self.task):
            raise ValueError(
                f"default_strategy {self.default_strategy!r} is for classification only "
                f"({', '.join(sorted(CLASSIFICATION_ONLY))})"
            )
        return self


class PoolPublic(BaseModel):
    id: int
    name: str
    task: Task
    classes: list[str] | None
    target: str | None
    input_kind: InputKind
    model_spec: dict[str, Any]
    default_strategy: str
    default_budget: int
    default_epsilon: float | Literal["auto"] | None
    created_at: datetime
    items: int = Field(description="Items in the pool split (candidates for labeling).")
    labeled: int = Field(description="Items of the pool split with at least one label.")
    holdout: int = Field(description="Items in the holdout (evaluation) split.")
    rounds: int


class PoolsPublic(BaseModel):
    data: list[PoolPublic]
    count: int


# --- items -----------------------------------------------------------------------------


class ItemPublic(BaseModel):
    id: int
    pool_id: int
    sha256: str
    format: str = Field(description="png, jpeg, or npy (a numpy array)")
    kind: InputKind
    shape: list[int]
    dtype: str
    split: Split
    meta: dict[str, Any]
    created_at: datetime
    image_url: str | None = Field(description="The image bytes (PNG for arrays); None for vectors.")
    vector: list[float] | None = Field(
        default=None, description="The values of a vector item (GET /items/{id} only)."
    )


class VectorItemsCreate(BaseModel):
    model_config = _examples({"vectors": [[0.1, 2.5, -1.0], [0.3, 2.1, 0.0]], "split": "pool"})

    vectors: list[list[FiniteFloat]] = Field(min_length=1, max_length=100_000)
    split: Split = Split.pool
    meta: list[JsonObject] | None = Field(
        default=None, description="One object per vector, stored with the item."
    )

    @model_validator(mode="after")
    def _rectangular(self) -> "VectorItemsCreate":
        lengths = {len(v) for v in self.vectors}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError("all vectors must have the same, non-zero length")
        if self.meta is not None and len(self.meta) != len(self.vectors):
            raise ValueError(f"meta has {len(self.meta)} entries for {len(self.vectors)} vectors")
        return self


class Duplicate(BaseModel):
    index: int = Field(description="Position in the upload.")
    name: str
    item_id: int = Field(description="The item that already holds these bytes.")


class ItemsCreated(BaseModel):
    created: list[ItemPublic]
    duplicates: list[Duplicate]


HoldoutFraction = Annotated[
    float,
    Field(
        ge=0.0,
        lt=1.0,
        description="Share of the training split set aside as holdout, when the dataset has "
        "no test split.",
    ),
]


class ImportRequest(BaseModel):
    model_config = _examples({"dataset": "digits", "holdout_fraction": 0.2, "seed": 0})

    dataset: str = Field(description=f"A dataset shipped with the service: {', '.join(PACKAGED)}.")
    with_labels: bool = Field(
        default=False,
        description="Also store the pool split's ground truth as seed labels (default: only "
        "the holdout split's labels are stored, as the evaluation set).",
    )
    holdout_fraction: HoldoutFraction = 0.0
    seed: Seed = 0

    @model_validator(mode="after")
    def _known(self) -> "ImportRequest":
        if self.dataset not in PACKAGED:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; choose one of: {', '.join(PACKAGED)}"
            )
        return self


class ImportSummary(BaseModel):
    pool_id: int
    source: str
    added: dict[str, int] = Field(description="New items per split.")
    duplicates: int
    labels: int = Field(description="Labels stored: the holdout's, plus seeds if asked for.")


# --- rounds ----------------------------------------------------------------------------


class RoundCreate(BaseModel):
    model_config = _examples(
        {"pool_id": 1, "strategy": "ally", "budget": 100, "params": {"epsilon": 0.2}, "seed": 0}
    )

    pool_id: RowId
    strategy: StrategyName | None = Field(default=None, description="Default: the pool's.")
    budget: Budget | None = Field(default=None, description="Default: the pool's.")
    params: JsonObject = Field(
        default_factory=dict,
        description="The strategy's parameters: "
        + "; ".join(f"{name}: {accepted_params(name)}" for name in PARAMS)
        + ". ALLY's epsilon defaults to the pool's.",
    )
    seed: Seed = 0
    cold_start: bool = Field(
        default=True,
        description="With too few labels, seed the pool by k-means coverage (true) or refuse "
        "with 409 (false).",
    )


class RoundPublic(BaseModel):
    id: int
    pool_id: int
    number: int
    strategy: str
    params: dict[str, Any]
    budget: int
    seed: int
    seeding: str | None = Field(description="How a cold-start round picks its items.")
    labeled_at_start: int
    status: RoundStatus
    phase: str | None
    progress: float = Field(description="0..1")
    percent: float
    eta_seconds: float | None
    timings: dict[str, float]
    error: str | None
    metrics: dict[str, Any] | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RoundsPublic(BaseModel):
    data: list[RoundPublic]
    count: int


# --- queries ---------------------------------------------------------------------------


class QueryPublic(BaseModel):
    item_id: int
    rank: int
    score: float
    cluster: int | None
    image_url: str | None
    labeled: bool
    leased_to: str | None
    lease_until: datetime | None


class QueriesPage(BaseModel):
    round_id: int
    pool_id: int
    task: Task
    classes: list[str] | None = Field(description="The answers a label may take.")
    data: list[QueryPublic]
    count: int = Field(description="All queries of the round (without ?annotator).")
    offset: int
    limit: int


# --- labels ----------------------------------------------------------------------------


class LabelCreate(BaseModel):
    model_config = _examples({"item_id": 17, "value": "7", "round_id": 3})

    item_id: RowId
    # Strict: JSON true is not the class "1", and "2.5" is not a number.
    value: StrictStr | Annotated[FiniteFloat, Strict()] = Field(
        description="A class name, or a finite number (for regression, or naming a digit class)."
    )
    round_id: RowId | None = Field(
        default=None, description="Default: the latest round that queried the item."
    )
    annotator: Name | None = Field(default=None, description="Default: the API key's name.")


class LabelPublic(BaseModel):
    id: int
    item_id: int
    pool_id: int
    value: str | float
    annotator: str
    round_id: int | None
    created_at: datetime


class LabelsCreated(BaseModel):
    data: list[LabelPublic] = Field(description="The label now recorded for each input.")
    created: int = Field(description="New labels; the rest repeated an identical label.")


# --- learning curve --------------------------------------------------------------------


class CurvePoint(BaseModel):
    round_id: int
    number: int
    strategy: str
    labeled: int
    value: float | None


class LearningCurve(BaseModel):
    pool_id: int
    metric: str
    points: list[CurvePoint]


# --- keys and probes -------------------------------------------------------------------


class KeyCreate(BaseModel):
    model_config = _examples({"name": "alice", "role": "annotator", "pools": [3]})

    name: Name
    role: Role
    pools: list[RowId] | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Restrict an annotator key to these pools; omit it to see every pool.",
    )


class KeyPublic(BaseModel):
    id: int
    name: str
    role: Role
    pools: list[int] | None = Field(description="The pools the key is restricted to, or null.")
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(description="The key itself: shown this once, stored only as a hash.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
