"""ALLY's query: diverse selection over k-means clusters of predicted duals."""

import dataclasses

import numpy as np
import pytest

from worker.ally.dual_head import fit_dual_head
from worker.ally.registry import STRATEGIES, get_strategy
from worker.ally.select import Ally, diverse_top, head_inputs
from worker.ally.strategies import Evidence


def _evidence(n_pool: int = 400, n_labeled: int = 60, d: int = 8, seed: int = 0) -> Evidence:
    rng = np.random.default_rng(seed)
    labeled = rng.normal(size=(n_labeled, d)).astype(np.float32)
    return Evidence(
        task="classification",
        labeled_ids=np.arange(n_labeled) + 10_000,
        labeled_embeddings=labeled,
        duals=np.abs(labeled[:, 0]) * 2,  # duals grow with |first coordinate|
        pool_ids=np.arange(n_pool) * 3 + 1,
        pool_embeddings=rng.normal(size=(n_pool, d)).astype(np.float32),
        pool_outputs=rng.normal(size=(n_pool, 10)).astype(np.float32),
        labeled_outputs=rng.normal(size=(n_labeled, 10)).astype(np.float32),
    )


def test_one_per_cluster_when_k_equals_budget():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    clusters = np.array([0, 0, 1, 1, 2, 2])
    picked = diverse_top(scores, clusters, k=3, budget=3)
    assert sorted(clusters[picked].tolist()) == [0, 1, 2]
    assert picked.tolist() == [0, 2, 4]  # the best of each cluster, best first


def test_empty_cluster_is_back_filled_from_the_global_ranking():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    clusters = np.array([0, 0, 0, 1, 1])  # cluster 2 is empty
    picked = diverse_top(scores, clusters, k=3, budget=3)
    assert len(set(picked.tolist())) == 3
    assert set(picked.tolist()) == {0, 3, 1}  # best of 0, best of 1, then the next best overall


def test_equal_quotas_when_k_is_below_the_budget():
    rng = np.random.default_rng(1)
    scores, clusters = rng.random(100), rng.integers(0, 4, 100)
    picked = diverse_top(scores, clusters, k=4, budget=12)
    assert np.bincount(clusters[picked], minlength=4).tolist() == [3, 3, 3, 3]
    for c in range(4):  # each cluster contributes its own top three
        members = np.flatnonzero(clusters == c)
        top = members[np.argsort(-scores[members])[:3]]
        assert set(top) <= set(picked.tolist())


def test_cap_passes_over_outliers():
    scores = np.array([100.0, 0.9, 0.8, 0.7])
    clusters = np.zeros(4, dtype=int)
    assert diverse_top(scores, clusters, k=1, budget=2, cap=1.0).tolist() == [1, 2]


@pytest.mark.parametrize("budget", [1, 17, 50, 400])
def test_ally_returns_budget_distinct_pool_ids_one_per_cluster(budget):
    evidence = _evidence()
    query = Ally().select(evidence, budget, seed=0)
    assert len(query.ids) == budget == len(set(query.ids.tolist()))
    assert set(query.ids.tolist()) <= set(evidence.pool_ids.tolist())
    assert len(query.pool_scores) == len(evidence.pool_ids)  # every pool item is scored
    assert (query.pool_scores >= 0).all()
    if budget < 400:  # k-means with k = budget: at most one item per cluster
        assert len(set(query.clusters.tolist())) == budget


def test_same_seed_same_selection_for_every_strategy():
    evidence = _evidence()
    for name in STRATEGIES:
        first = get_strategy(name).select(evidence, 20, seed=5)
        again = get_strategy(name).select(evidence, 20, seed=5)
        assert first.ids.tolist() == again.ids.tolist(), name


def test_dual_head_learns_which_embeddings_carry_large_duals():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(300, 16)).astype(np.float32)
    duals = np.maximum(h[:, 0], 0) * 5
    head = fit_dual_head(h, duals, seed=0)
    probe = rng.normal(size=(500, 16)).astype(np.float32)
    predicted = head.predict(probe)
    truth = np.maximum(probe[:, 0], 0) * 5
    assert predicted.shape == (500,) and (predicted >= 0).all()
    assert np.corrcoef(predicted, truth)[0, 1] > 0.8


def test_dual_head_handles_tiny_and_all_zero_labeled_sets():
    h = np.ones((1, 4), dtype=np.float32)
    assert (
        fit_dual_head(h, np.array([0.7]), seed=0).predict(np.zeros((3, 4))).tolist()
        == [pytest.approx(0.7)] * 3
    )
    two = fit_dual_head(np.eye(2, 4, dtype=np.float32), np.array([0.0, 1.0]), seed=0)
    assert two.predict(np.zeros((5, 4), dtype=np.float32)).shape == (5,)
    zero = fit_dual_head(np.eye(3, 4, dtype=np.float32), np.zeros(3), seed=0)
    assert (zero.predict(np.zeros((5, 4), dtype=np.float32)) == 0).all()


def test_unknown_strategy_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"choose one of: .*ally.*random"):
        get_strategy("bald")


def test_budget_larger_than_the_pool_is_refused():
    with pytest.raises(ValueError, match="budget"):
        Ally().select(_evidence(n_pool=10), 11, seed=0)


def test_a_benchmark_strategy_spec_with_an_unknown_parameter_is_a_clear_error():
    from worker.ally.bench import parse_strategy

    assert parse_strategy("ally:k=5+epsilon=auto") == Ally(k=5, epsilon="auto")
    assert parse_strategy("ally:dual_cap_quantile=none").dual_cap_quantile is None
    with pytest.raises(ValueError, match="bogus"):
        parse_strategy("ally:bogus=1")


def test_head_inputs_append_the_sorted_class_probabilities():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(5, 3)).astype(np.float32)
    logits = rng.normal(size=(5, 4)).astype(np.float32) * 3
    inputs = head_inputs(embeddings, logits, "classification")
    assert inputs.shape == (5, 7)
    assert np.array_equal(inputs[:, :3], embeddings)
    profile = inputs[:, 3:]
    assert np.allclose(profile.sum(1), 1, atol=1e-6)
    assert (np.diff(profile, axis=1) <= 0).all()  # most likely class first
    assert np.allclose(profile[:, 0], np.exp(logits).max(1) / np.exp(logits).sum(1), atol=1e-6)
    predictions = rng.normal(size=(5, 1)).astype(np.float32)
    assert np.array_equal(
        head_inputs(embeddings, predictions, "regression")[:, 3], predictions[:, 0]
    )


def _confidence_evidence(seed: int = 0) -> Evidence:
    """Duals that depend only on how sure the model is; embeddings that tell nothing."""
    rng = np.random.default_rng(seed)

    def outputs(n: int) -> np.ndarray:
        margin = rng.uniform(0, 6, size=n)  # logit gap between the top two classes
        return np.stack([margin, np.zeros(n), np.full(n, -8.0)], axis=1).astype(np.float32)

    labeled_outputs, pool_outputs = outputs(200), outputs(1000)
    return Evidence(
        task="classification",
        labeled_ids=np.arange(200),
        labeled_embeddings=rng.normal(size=(200, 4)).astype(np.float32),
        duals=np.maximum(0, 3 - labeled_outputs[:, 0]),  # hard near the decision boundary
        pool_ids=np.arange(1000) + 1000,
        pool_embeddings=rng.normal(size=(1000, 4)).astype(np.float32),
        pool_outputs=pool_outputs,
        labeled_outputs=labeled_outputs,
    )


def test_confidence_lets_the_dual_head_find_items_near_the_decision_boundary():
    evidence = _confidence_evidence()
    gap = evidence.pool_outputs[:, 0]
    with_profile = Ally(k=1, confidence=True, dual_cap_quantile=None).select(evidence, 50, seed=0)
    blind = Ally(k=1, confidence=False, dual_cap_quantile=None).select(evidence, 50, seed=0)
    assert np.corrcoef(with_profile.pool_scores, -gap)[0, 1] > 0.8
    assert abs(np.corrcoef(blind.pool_scores, -gap)[0, 1]) < 0.3
    assert gap[with_profile.ids - 1000].mean() < 1.5 < gap[blind.ids - 1000].mean()


def test_confidence_needs_the_labeled_outputs():
    evidence = dataclasses.replace(_evidence(), labeled_outputs=None)
    with pytest.raises(ValueError, match="outputs on the labeled items"):
        Ally(confidence=True).select(evidence, 5, seed=0)
