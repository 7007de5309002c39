"""ALLY's query: predicted duals ranked within k-means clusters of the pool (paper §4.2, §5.1)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

from worker.ally.dual_head import DualHeadConfig, fit_dual_head
from worker.ally.pdcl import DEFAULT_EPSILON, Task
from worker.ally.strategies import Evidence, Selection, Strategy


def cluster(embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means cluster index [N] of each row of `embeddings` [N, d]."""
    if k <= 1:
        return np.zeros(len(embeddings), dtype=np.int64)
    kmeans = MiniBatchKMeans(
        n_clusters=k,
        random_state=seed,
        n_init=1,
        batch_size=max(2048, 4 * k),
        max_no_improvement=5,
    )
    # One thread: as fast as two on a quiet 2-core machine (20 s vs 23 s for 1M × 128,
    # k = 1,000), and about 6× faster when other work holds a core (OpenMP threads spin).
    with threadpool_limits(1):
        labels = kmeans.fit_predict(np.ascontiguousarray(embeddings, dtype=np.float32))
    return labels.astype(np.int64)


def diverse_top(
    scores: np.ndarray, clusters: np.ndarray, k: int, budget: int, cap: float | None = None
) -> np.ndarray:
    """Positions of `budget` distinct items: the top budget/k scores of each of the k clusters.

    Clusters get equal quotas (the first budget mod k clusters one more). Within a cluster, items
    scoring above `cap` rank after the others, so a suspected outlier is taken only when its
    cluster has nothing else left (a cluster made only of such items still fills its quota).
    Quotas a cluster cannot fill (too small or empty) are back-filled from the global ranking.
    """
    key = np.where(scores > cap, -np.inf, scores) if cap is not None else scores
    order = np.argsort(-key, kind="stable")  # global ranking, best first
    # Rank of each item within its cluster, by a stable regroup of the global ranking.
    grouped = order[np.argsort(clusters[order], kind="stable")]
    starts = np.searchsorted(clusters[grouped], clusters[grouped], side="left")
    rank_in_cluster = np.empty(len(scores), dtype=np.int64)
    rank_in_cluster[grouped] = np.arange(len(grouped)) - starts
    quota = budget // k + (clusters < budget % k)
    picked = order[rank_in_cluster[order] < quota[order]][:budget]
    if len(picked) < budget:
        rest = order[~np.isin(order, picked)]
        picked = np.concatenate([picked, rest[: budget - len(picked)]])
    # Present the query best first.
    return picked[np.argsort(-key[picked], kind="stable")]


@dataclass
class Ally(Strategy):
    """Active Learning via Lagrangian dualitY: query the items with the largest predicted duals.

    `k` clusters (default: the budget, the paper's choice); `dual_cap_quantile` passes over
    items whose predicted dual is above that quantile of the pool's (paper §4.4, outliers);
    `epsilon` = the constraint level for training: "auto" (§5.4), a number, or None for the
    paper's fixed per-task level; `confidence` appends the model's confidence profile to the
    embedding the dual head sees (see `head_inputs`).

    The defaults are the best setting measured on MNIST (docs/benchmarks/README.md); the
    paper's own is `Ally(epsilon=None, dual_cap_quantile=None, confidence=False)`.
    """

    k: int | None = None
    dual_cap_quantile: float | None = 0.95
    epsilon: float | str | None = "auto"
    confidence: bool = True
    head: DualHeadConfig = field(default_factory=DualHeadConfig)

    name = "ally"

    def constraint(self, task: Task) -> float | str | None:
        return DEFAULT_EPSILON[task] if self.epsilon is None else self.epsilon

    def select(self, evidence: Evidence, budget: int, seed: int) -> Selection:
        self.check(evidence, budget)
        k = min(self.k or budget, budget)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        started = time.perf_counter()
        if self.confidence and evidence.labeled_outputs is None:
            raise ValueError("confidence needs the model's outputs on the labeled items")
        labeled_inputs = evidence.labeled_embeddings
        pool_inputs = evidence.pool_embeddings
        if self.confidence:
            labeled_inputs = head_inputs(labeled_inputs, evidence.labeled_outputs, evidence.task)
            pool_inputs = head_inputs(pool_inputs, evidence.pool_outputs, evidence.task)
        head = fit_dual_head(labeled_inputs, evidence.duals, seed, self.head)
        predicted = head.predict(pool_inputs)
        head_seconds = time.perf_counter() - started
        labels = cluster(evidence.pool_embeddings, k, seed)
        cap = (
            float(np.quantile(predicted, self.dual_cap_quantile))
            if self.dual_cap_quantile is not None
            else None
        )
        picked = diverse_top(predicted, labels, k, budget, cap)
        return Selection(
            ids=evidence.pool_ids[picked],
            scores=predicted[picked],
            clusters=labels[picked],
            pool_scores=predicted,
            seconds={"dual_head": head_seconds},
        )


def head_inputs(embeddings: np.ndarray, outputs: np.ndarray, task: Task) -> np.ndarray:
    """Embeddings [N, d] with the model's confidence profile appended: [N, d + C] or [N, d + 1].

    For classification, the class probabilities sorted in decreasing order: how sure the model
    is, whatever the class. The embedding alone tells the head *where* an item lies; the
    profile tells it how close the item is to a decision boundary, which is where hard
    labeled samples (large duals) lie. For regression, the prediction itself.
    """
    if task == "classification":
        logits = outputs - outputs.max(axis=1, keepdims=True)
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        profile = -np.sort(-probabilities, axis=1)
    else:
        profile = outputs.reshape(len(outputs), -1)
    return np.hstack([embeddings, profile.astype(np.float32)])


def kmeans_coverage(features: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Positions of `budget` items covering the pool: the item nearest each k-means centre.

    The cold-start query, when too few labels exist to train a model: `features` [N, d] are
    untrained (e.g. PCA of the raw inputs).
    """
    kmeans = MiniBatchKMeans(n_clusters=budget, random_state=seed, n_init=1, batch_size=4096)
    with threadpool_limits(1):  # see `cluster`
        labels = kmeans.fit_predict(np.ascontiguousarray(features, dtype=np.float32))
    distance = np.linalg.norm(features - kmeans.cluster_centers_[labels], axis=1)
    order = np.lexsort((distance, labels))  # by cluster, nearest to its centre first
    first = order[np.r_[True, labels[order][1:] != labels[order][:-1]]]
    if len(first) < budget:  # empty clusters: the next most central items overall
        rest = np.argsort(distance, kind="stable")
        first = np.concatenate([first, rest[~np.isin(rest, first)][: budget - len(first)]])
    return first[:budget]
