"""Query strategies behind one interface, looked up by name.

A strategy sees only what the trained model says about the labeled set and the pool
(`Evidence`) and returns the `budget` pool items to label next (a `Selection`). Training is
shared: every strategy is trained by `pdcl.train`, constrained only when the strategy asks
for a constraint level (ALLY), so comparisons between strategies are fair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Evidence:
    """What a trained model tells about the labeled set and the unlabeled pool."""

    task: Task
    labeled_ids: np.ndarray  # [L] item ids
    labeled_embeddings: np.ndarray  # [L, d] float32
    duals: np.ndarray  # [L] final PDCL duals (zeros when trained unconstrained)
    pool_ids: np.ndarray  # [N] item ids
    pool_embeddings: np.ndarray  # [N, d] float32
    pool_outputs: np.ndarray  # [N, C] logits (classification) or [N, 1] predictions
    labeled_outputs: np.ndarray | None = None  # [L, C] or [L, 1], like pool_outputs


@dataclass(frozen=True)
class Selection:
    """The items to label, best first."""

    ids: np.ndarray  # [budget] distinct pool item ids, in rank order
    scores: np.ndarray  # [budget] the strategy's score of each (higher = more informative)
    clusters: np.ndarray | None = None  # [budget] k-means cluster of each, when clustered
    pool_scores: np.ndarray | None = None  # [N] score of every pool item (ALLY: predicted duals)
    seconds: dict[str, float] = field(default_factory=dict)  # time of named sub-steps


class Strategy:
    """Base class: subclasses set `name` and implement `select`."""

    name: ClassVar[str]
    tasks: ClassVar[frozenset[str]] = frozenset({"classification", "regression"})

    def constraint(self, task: Task) -> float | str | None:
        """The ε to train with (see `pdcl.PDCLConfig.epsilon`); None: unconstrained ERM."""
        return None

    def select(self, evidence: Evidence, budget: int, seed: int) -> Selection:
        raise NotImplementedError

    def check(self, evidence: Evidence, budget: int) -> None:
        """Raise ValueError when this strategy cannot serve this pool and budget."""
        if evidence.task not in self.tasks:
            raise ValueError(
                f"strategy {self.name!r} supports {sorted(self.tasks)}, not {evidence.task}"
            )
        if not 1 <= budget <= len(evidence.pool_ids):
            raise ValueError(
                f"budget must be between 1 and the {len(evidence.pool_ids)} unlabeled items, "
                f"got {budget}"
            )


class RandomSampling(Strategy):
    """Uniform sampling without replacement: the baseline every strategy must beat."""

    name = "random"

    def select(self, evidence: Evidence, budget: int, seed: int) -> Selection:
        self.check(evidence, budget)
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(evidence.pool_ids), size=budget, replace=False)
        return Selection(ids=evidence.pool_ids[picked], scores=np.zeros(budget, dtype=np.float32))
