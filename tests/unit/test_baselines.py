"""Baselines: each strategy's defining property on crafted inputs, plus the shared contract."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from worker.ally.baselines import BADGE, Coreset, EntropySampling, MarginSampling
from worker.ally.strategies import Evidence, RandomSampling, Strategy
from worker.bench_selection import _reset_peak_rss, _status_kib

ROOT = Path(__file__).resolve().parents[2]
CLASSIFICATION_ONLY = [EntropySampling, MarginSampling, BADGE]
EVERY = [RandomSampling, EntropySampling, MarginSampling, BADGE, Coreset]


def evidence(
    pool_embeddings: np.ndarray,
    pool_outputs: np.ndarray,
    labeled_embeddings: np.ndarray | None = None,
    task: str = "classification",
) -> Evidence:
    """Evidence with pool ids 100, 101, … and labeled ids 0, 1, …, so the two never overlap."""
    labeled = np.zeros((0, pool_embeddings.shape[1]), np.float32)
    if labeled_embeddings is not None:
        labeled = labeled_embeddings
    return Evidence(
        task=task,  # type: ignore[arg-type]
        labeled_ids=np.arange(len(labeled)),
        labeled_embeddings=np.asarray(labeled, np.float32),
        duals=np.zeros(len(labeled), np.float32),
        pool_ids=100 + np.arange(len(pool_embeddings)),
        pool_embeddings=np.asarray(pool_embeddings, np.float32),
        pool_outputs=np.asarray(pool_outputs, np.float32),
    )


def random_evidence(n: int = 300, d: int = 8, classes: int = 4, seed: int = 0) -> Evidence:
    rng = np.random.default_rng(seed)
    return evidence(
        rng.standard_normal((n, d)),
        3.0 * rng.standard_normal((n, classes)),
        rng.standard_normal((20, d)),
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def gradient_embeddings(ev: Evidence) -> np.ndarray:
    """The N × (C·d) matrix BADGE must never build, built here on a tiny pool to check it."""
    p = softmax(ev.pool_outputs.astype(np.float64))  # [N, C]
    a = -p
    a[np.arange(len(p)), p.argmax(axis=1)] += 1.0
    return (a[:, :, None] * ev.pool_embeddings[:, None, :]).reshape(len(p), -1)  # [N, C·d]


def test_entropy_picks_the_most_uncertain_first():
    logits = np.full((6, 3), [8.0, 0.0, 0.0])  # confident
    logits[4] = [0.0, 0.0, 0.0]  # uniform: the most uncertain
    logits[1] = [1.0, 0.0, 0.0]  # next
    query = EntropySampling().select(evidence(np.zeros((6, 2)), logits), 2, seed=0)
    assert query.ids.tolist() == [104, 101]
    assert query.scores[0] == pytest.approx(np.log(3), rel=1e-5)


def test_margin_ranks_by_the_top_two_gap_where_entropy_disagrees():
    p = np.array(
        [
            [0.90, 0.04, 0.03, 0.03],
            [0.46, 0.44, 0.05, 0.05],  # gap 0.02, low entropy: margin's first
            [0.40, 0.20, 0.20, 0.20],  # gap 0.20, highest entropy: entropy's first
            [0.70, 0.10, 0.10, 0.10],
        ]
    )
    ev = evidence(np.zeros((4, 2)), np.log(p))
    margin = MarginSampling().select(ev, 2, seed=0)
    assert margin.ids.tolist() == [101, 102]
    assert margin.scores.tolist() == pytest.approx([0.98, 0.80], abs=1e-5)
    assert EntropySampling().select(ev, 1, seed=0).ids.tolist() == [102]


def test_coreset_first_pick_is_the_farthest_from_the_labeled_set():
    ev = random_evidence()
    distances = np.linalg.norm(
        ev.pool_embeddings[:, None, :] - ev.labeled_embeddings[None, :, :], axis=2
    ).min(axis=1)  # [N]
    query = Coreset().select(ev, 5, seed=0)
    assert query.ids[0] == ev.pool_ids[np.argmax(distances)]
    assert query.scores[0] == pytest.approx(distances.max(), rel=1e-5)


@pytest.mark.parametrize("candidates", [4, 4096])  # 4: the candidate set is rebuilt often
def test_coreset_matches_plain_k_center_greedy(candidates: int):
    ev = random_evidence(n=400)
    pool = ev.pool_embeddings.astype(np.float64)
    sq = ((pool[:, None, :] - ev.labeled_embeddings[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    expected, expected_scores = [], []
    for _ in range(60):
        best = int(np.argmax(sq))
        expected.append(best)
        expected_scores.append(np.sqrt(sq[best]))
        sq = np.minimum(sq, ((pool - pool[best]) ** 2).sum(axis=1))
        sq[best] = -1.0
    query = Coreset(candidates=candidates).select(ev, 60, seed=0)
    assert query.ids.tolist() == ev.pool_ids[expected].tolist()
    assert query.scores == pytest.approx(expected_scores, rel=1e-4)


def test_badge_first_pick_has_the_largest_gradient_embedding_and_scores_are_distances():
    ev = random_evidence()
    g = gradient_embeddings(ev)  # [N, C·d]
    query = BADGE().select(ev, 30, seed=0)
    picked = query.ids - 100
    assert picked[0] == np.argmax(np.linalg.norm(g, axis=1))
    for k in range(1, 30):
        nearest = np.linalg.norm(g[picked[:k]] - g[picked[k]], axis=1).min()
        assert query.scores[k] == pytest.approx(nearest, rel=1e-4)


@pytest.mark.parametrize(
    ("max_pending", "max_rejections"),
    [(64, 10_000), (1, 1)],  # draws checked against pending picks; a full pass per pick
)
def test_badge_samples_exactly_proportional_to_squared_distance(
    max_pending: int, max_rejections: int
):
    # Equal logits make every g = a ⊗ h with one a, so the geometry is that of h: A has the
    # largest norm; B and B' are far twins; C is near A. Exact k-means++ takes A, then B or
    # B', then almost surely C (P = 0.96); a sampler that ignored the pick not yet folded
    # into its distances would take the twin instead (P ≈ 0.95).
    h = np.array([[5.0, 0.0], [0.0, -4.0], [0.3, -4.0], [4.0, 1.0]])  # A, B, B', C
    ev = evidence(h, np.tile([1.0, 0.0, 0.0], (4, 1)))
    g = gradient_embeddings(ev)
    sq = ((g[:, None, :] - g[None, :, :]) ** 2).sum(axis=2)  # [4, 4]
    exact = {}
    for second in (1, 2, 3):
        nearest = np.minimum(sq[0], sq[second])  # [4]
        for third in (1, 2, 3):
            exact[second, third] = sq[0, second] / sq[0].sum() * nearest[third] / nearest.sum()
    strategy = BADGE(max_pending=max_pending, max_rejections=max_rejections)
    draws = 800
    seen = Counter()
    for seed in range(draws):
        picked = strategy.select(ev, 3, seed).ids - 100
        assert picked[0] == 0
        seen[int(picked[1]), int(picked[2])] += 1
    twin = (seen[1, 2] + seen[2, 1]) / draws
    assert twin == pytest.approx(exact[1, 2] + exact[2, 1], abs=0.03)  # about 4 sigma
    total_variation = 0.5 * sum(abs(seen[k] / draws - p) for k, p in exact.items())
    assert total_variation < 0.07  # sampling noise is about 0.025 at 800 draws


@pytest.mark.parametrize("strategy_class", EVERY)
@pytest.mark.parametrize("case", ["some", "whole pool", "duplicate rows", "all identical"])
def test_returns_exactly_budget_distinct_unlabeled_ids(strategy_class: type[Strategy], case: str):
    ev = random_evidence(n=40)
    budget = 7
    if case == "whole pool":
        budget = 40
    elif case == "duplicate rows":
        # every row four times, and the labeled set equal to some of them: many zero distances
        emb = np.repeat(ev.pool_embeddings[:10], 4, axis=0)
        ev = evidence(emb, np.repeat(ev.pool_outputs[:10], 4, axis=0), emb[:8:4])
        budget = 40
    elif case == "all identical":
        ev = evidence(np.ones((12, 8)), np.ones((12, 4)), np.ones((3, 8)))
        budget = 12
    query = strategy_class().select(ev, budget, seed=3)
    assert len(query.ids) == budget == len(query.scores)
    assert len(set(query.ids.tolist())) == budget
    assert set(query.ids.tolist()) <= set(ev.pool_ids.tolist())
    assert not set(query.ids.tolist()) & set(ev.labeled_ids.tolist())
    assert np.isfinite(query.scores).all()


@pytest.mark.parametrize("strategy_class", [BADGE, Coreset])
def test_duplicates_of_picks_score_zero_and_come_last(strategy_class: type[Strategy]):
    emb = np.repeat(np.eye(3, 4) * np.array([[1.0], [2.0], [3.0]]), 2, axis=0)  # 3 pairs
    ev = evidence(emb, np.tile([2.0, 0.0], (6, 1)))
    query = strategy_class().select(ev, 6, seed=0)
    assert len({int(i) // 2 for i in query.ids[:3] - 100}) == 3  # one of each pair first
    assert query.scores[3:].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("strategy_class", EVERY)
def test_same_seed_same_selection(strategy_class: type[Strategy]):
    ev = random_evidence()
    first = strategy_class().select(ev, 25, seed=7)
    again = strategy_class().select(ev, 25, seed=7)
    assert first.ids.tolist() == again.ids.tolist()
    np.testing.assert_array_equal(first.scores, again.scores)


def test_badge_depends_on_the_seed():
    ev = random_evidence()
    picks = {tuple(BADGE().select(ev, 25, seed=s).ids.tolist()) for s in range(3)}
    assert len(picks) == 3


@pytest.mark.parametrize("strategy_class", CLASSIFICATION_ONLY)
def test_classification_only_strategies_refuse_a_regression_pool(
    strategy_class: type[Strategy],
):
    rng = np.random.default_rng(0)
    ev = evidence(rng.standard_normal((30, 4)), rng.standard_normal((30, 1)), task="regression")
    with pytest.raises(ValueError, match="classification") as error:
        strategy_class().select(ev, 5, seed=0)
    assert strategy_class.name in str(error.value)
    assert "regression" in str(error.value)


def test_coreset_serves_a_regression_pool():
    rng = np.random.default_rng(0)
    ev = evidence(
        rng.standard_normal((30, 4)),
        rng.standard_normal((30, 1)),
        rng.standard_normal((5, 4)),
        task="regression",
    )
    assert len(set(Coreset().select(ev, 5, seed=0).ids.tolist())) == 5


@pytest.mark.parametrize("strategy_class", [EntropySampling, MarginSampling, BADGE])
def test_extreme_logits_give_finite_scores(strategy_class: type[Strategy]):
    logits = np.full((50, 5), -1e4)
    logits[np.arange(50), np.arange(50) % 5] = 1e4  # certain: entropy 0, margin 1
    logits[3, :2] = 1e4  # a coin flip between two classes
    logits[7] = [np.inf, -np.inf, 0.0, 0.0, 0.0]
    ev = evidence(np.random.default_rng(0).standard_normal((50, 6)), logits)
    query = strategy_class().select(ev, 50, seed=0)
    assert np.isfinite(query.scores).all()
    if strategy_class is not BADGE:
        assert query.ids[0] == 103  # the 50/50 item is the most uncertain


def test_nan_logits_fail_loudly():
    logits = np.zeros((5, 3))
    logits[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        EntropySampling().select(evidence(np.zeros((5, 2)), logits), 2, seed=0)


def test_peak_rss_instrument_sees_a_400_mb_allocation():
    """The memory test below is only as good as its instrument."""
    if not _reset_peak_rss():
        pytest.skip("needs Linux /proc/self/clear_refs")
    before = _status_kib("VmRSS")
    block = np.ones(50_000_000)  # 400 MB, touched
    del block
    assert _status_kib("VmHWM") - before > 380 * 1024


MEMORY_LIMIT_MB = 200  # the N × (C·d) matrix alone would be 200,000 × 1,280 × 4 B = 1,024 MB


def test_badge_and_coreset_memory_stays_bounded_on_200k_items():
    """Peak RSS of `select` above the RSS before it, each in a fresh process (d=128, C=10)."""
    child = (
        "import json; from worker.ally.baselines import {0};"
        "from worker.bench_selection import measure;"
        "print(json.dumps(measure({0}(), 200_000, 50, labeled=200, repeats=1)))"
    )
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-c", child.format(name)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("BADGE", "Coreset")
    }
    for name, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["peak_measure"] == "VmHWM after clear_refs", "peak not measured exactly"
        assert 0 < result["peak_extra_mb"] < MEMORY_LIMIT_MB, (name, result)
