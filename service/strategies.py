"""The query strategies the product offers, as the API spells them (the worker has the code).

Each strategy's parameters are declared here, with their types and bounds, so a round is
refused at the API rather than failing in the worker; `tests/service/test_strategies.py`
checks this table against the worker's registry.
"""

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

StrategyName = Literal["ally", "random", "entropy", "margin", "badge", "coreset"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
# These score items by class probabilities or per-class gradients.
CLASSIFICATION_ONLY = frozenset({"entropy", "margin", "badge"})
# How a cold-start round picks its items while too few are labeled to train a model.
COLD_START_SEEDING = "kmeans-coverage"

# ALLY's constraint level: a positive number, or "auto" to calibrate it (paper §5.4).
Epsilon = Annotated[FiniteFloat, Field(gt=0, strict=True)] | Literal["auto"]


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllyParams(NoParams):
    """The defaults are the worker's (`worker.ally.select.Ally`): the best measured setting."""

    k: int | None = Field(
        default=None, ge=1, description="Clusters to spread the picks over (null: the budget)."
    )
    dual_cap_quantile: float | None = Field(
        default=0.95,
        gt=0,
        le=1,
        description="Within each cluster, rank items whose predicted dual is above this "
        "quantile last (null: no cap).",
    )
    epsilon: Epsilon | None = Field(
        default="auto",
        description="The constraint level: 'auto' calibrates it, null is the paper's fixed "
        "0.2 nats (classification) or 0.1 (standardized regression).",
    )
    confidence: bool = Field(
        default=True,
        description="Let the dual head see the model's sorted class probabilities as well.",
    )


class BadgeParams(NoParams):
    max_pending: int = Field(default=64, ge=1, description="Picks between full passes.")
    max_rejections: int = Field(default=8, ge=1, description="Rejected draws forcing a pass.")


class CoresetParams(NoParams):
    candidates: int = Field(default=4096, ge=1, description="Points kept exact after a pick.")


PARAMS: dict[str, type[NoParams]] = {
    "ally": AllyParams,
    "random": NoParams,
    "entropy": NoParams,
    "margin": NoParams,
    "badge": BadgeParams,
    "coreset": CoresetParams,
}


def supports(strategy: str, task: str) -> bool:
    return task == "classification" or strategy not in CLASSIFICATION_ONLY


def accepted_params(strategy: str) -> str:
    """The parameters `strategy` takes, for error messages."""
    names = PARAMS[strategy].model_fields
    return ", ".join(names) if names else "none"
