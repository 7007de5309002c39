"""The query strategies the product offers, as the API spells them (the worker has the code)."""

from typing import Literal, get_args

StrategyName = Literal["ally", "random", "entropy", "margin", "badge", "coreset"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
# These score items by class probabilities or per-class gradients.
CLASSIFICATION_ONLY = frozenset({"entropy", "margin", "badge"})
# How a cold-start round picks its items while too few are labeled to train a model.
COLD_START_SEEDING = "kmeans-coverage"


def supports(strategy: str, task: str) -> bool:
    return task == "classification" or strategy not in CLASSIFICATION_ONLY
