"""Baseline query strategies: entropy, margin, BADGE and Coreset (k-center greedy).

Selection cost is linear in the pool and memory is O(N·(C + d)): nothing of size N × (C·d)
or N × N is ever built. BADGE and Coreset touch the pool in chunks of rows, and both avoid a
full pass over the pool per pick while keeping the exact result of the textbook algorithm:

- BADGE (Ash et al., 2020) seeds k-means++ on gradient embeddings `(onehot(ŷ) − p) ⊗ h`.
  Distances come from `‖a⊗h − a'⊗h'‖² = ‖a‖²‖h‖² + ‖a'‖²‖h'‖² − 2(a·a')(h·h')`. Centres
  are folded into the min-distances in batches (one matrix product per batch instead of one
  pass per centre); in between, a draw from the stale distances is accepted with probability
  `new / stale`, which samples exactly ∝ the current squared distance.
- Coreset (Sener & Savarese, 2018) is farthest-first traversal from the labeled set. Stale
  min-distances are upper bounds, so only a small candidate set at the top is kept exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from worker.ally.strategies import Evidence, Selection, Strategy

# Elements in one [rows, centres] temporary: 2**21 float32 = 8 MB, a few alive at once.
BLOCK_ELEMENTS = 2**21
# Squared distances below this fraction of ‖x‖² are float32 cancellation noise (the error of
# ‖x‖² + ‖c‖² − 2⟨x, c⟩ is about 1e-6 ‖x‖² at d = 128): a duplicate row must be at distance
# exactly 0, so that ties are handled as ties.
SAME_POINT_RTOL = 2e-5


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 tensor on `device`; shares memory with `array` when it is float32 on the CPU."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)


def _probabilities(logits: np.ndarray, device: torch.device) -> torch.Tensor:
    """softmax of the logits [N, C], finite even for ±inf logits."""
    x = _tensor(logits, device)  # [N, C]
    if torch.isnan(x).any():
        raise ValueError("pool_outputs contain NaN: the model diverged")
    # softmax subtracts the row max; an infinite max would give inf − inf = NaN
    return torch.softmax(torch.nan_to_num(x), dim=1)


def _top(scores: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the `budget` highest scores, best first; ties go to the lower index."""
    n = len(scores)
    kth = np.partition(scores, n - budget)[n - budget]
    candidates = np.flatnonzero(scores >= kth)  # O(N) instead of sorting the whole pool
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order[:budget]]


def _ranked_query(evidence: Evidence, scores: torch.Tensor, budget: int) -> Selection:
    values = scores.float().cpu().numpy()  # [N]
    picked = _top(values, budget)
    return Selection(ids=evidence.pool_ids[picked], scores=values[picked])


@dataclass(frozen=True)
class _Points:
    """Points x = f_1 ⊗ f_2 ⊗ … given by their factors, never formed.

    Inner products factorise, ⟨⊗f, ⊗f'⟩ = Π ⟨f_k, f'_k⟩, so a distance costs O(Σ d_k)
    instead of O(Π d_k). One factor is plain Euclidean space (Coreset); BADGE uses two.
    """

    factors: tuple[torch.Tensor, ...]  # each [n, d_k]
    sq_norm: torch.Tensor  # [n] ‖x‖²

    @classmethod
    def of(cls, *factors: torch.Tensor) -> _Points:
        # a reduction kernel: (f * f).sum(1) would allocate an [n, d_k] temporary
        sq_norm = math.prod(torch.linalg.vector_norm(f, dim=1).square() for f in factors)
        return cls(factors=factors, sq_norm=sq_norm)

    def __len__(self) -> int:
        return len(self.sq_norm)

    def rows(self, index: slice | torch.Tensor) -> _Points:
        return _Points(tuple(f[index] for f in self.factors), self.sq_norm[index])

    def min_sq_dist(self, centres: _Points) -> torch.Tensor:
        """Squared distance [n] from each point to its nearest centre, in blocks of both."""
        out = torch.full((len(self),), math.inf, device=self.sq_norm.device)  # [n]
        cols = max(1, min(len(centres), 1024))
        rows = max(1, BLOCK_ELEMENTS // cols)
        for c in range(0, len(centres), cols):
            block = centres.rows(slice(c, c + cols))
            bias = block.sq_norm[None, :]  # [1, cols]
            for r in range(0, len(self), rows):
                part = self.rows(slice(r, r + rows))
                # min_c ‖x − c‖² = ‖x‖² + min_c (‖c‖² − 2⟨x, c⟩): ‖x‖² is added after the
                # min, and ‖c‖² − 2⟨x, c⟩ is fused into the last product, to save passes
                *head, last = zip(part.factors, block.factors, strict=True)
                if head:
                    scale = math.prod(f @ g.T for f, g in head)  # [rows, cols]
                    partial = torch.addcmul(bias, scale, last[0] @ last[1].T, value=-2)
                else:
                    partial = torch.addmm(bias, last[0], last[1].T, alpha=-2)
                nearest = partial.amin(dim=1).add_(part.sq_norm)  # [rows]
                # duplicates have equal norms, so the noise scales with ‖x‖²
                nearest = torch.where(nearest > SAME_POINT_RTOL * part.sq_norm, nearest, 0.0)
                torch.minimum(out[r : r + rows], nearest, out=out[r : r + rows])
        return out


def _gradient_embedding_factors(
    logits: np.ndarray, embeddings: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the last-layer gradient embedding g = (onehot(ŷ) − p) ⊗ h."""
    p = _probabilities(logits, device)  # [N, C]
    a = -p
    a[torch.arange(len(p), device=device), p.argmax(dim=1)] += 1.0  # onehot(ŷ) − p
    return a, _tensor(embeddings, device)  # [N, C], [N, d]


def _kmeans_pp_seeding(
    points: _Points,
    budget: int,
    rng: np.random.Generator,
    max_pending: int,
    max_rejections: int,
) -> tuple[list[int], list[float]]:
    """k-means++ seeding from the largest-norm point; returns picks and their distances."""
    n = len(points)
    first = int(torch.argmax(points.sq_norm))
    picks, scores = [first], [math.sqrt(float(points.sq_norm[first]))]
    chosen = np.zeros(n, dtype=bool)  # [N]
    chosen[first] = True
    sq_dist = torch.full((n,), math.inf, device=points.sq_norm.device)  # [N] stale min-distances
    stale = cumulative = np.zeros(0)  # [N] sq_dist as of the last full pass, and its cumsum
    # Picks not yet folded into sq_dist, as small float64 arrays: checking one draw against
    # them in numpy costs microseconds, where torch's per-op overhead would dominate.
    pending: list[int] = []
    pending_factors = [np.zeros((0, f.shape[1])) for f in points.factors]  # each [P, d_k]
    pending_sq = np.zeros(0)  # [P]
    rejections = 0

    def row(i: int) -> list[np.ndarray]:
        return [f[i].double().cpu().numpy() for f in points.factors]

    def add_pending(i: int) -> None:
        nonlocal pending_factors, pending_sq
        x = row(i)
        pending.append(i)
        pending_factors = [np.vstack([f, r]) for f, r in zip(pending_factors, x, strict=True)]
        pending_sq = np.append(pending_sq, math.prod(float(r @ r) for r in x))

    def fold_pending() -> None:
        nonlocal stale, cumulative, pending_factors, pending_sq, rejections
        centres = points.rows(torch.tensor(pending, device=sq_dist.device))
        torch.minimum(sq_dist, points.min_sq_dist(centres), out=sq_dist)
        sq_dist[torch.from_numpy(np.flatnonzero(chosen)).to(sq_dist.device)] = 0.0
        stale = sq_dist.cpu().numpy().astype(np.float64)
        cumulative = np.cumsum(stale)  # float64: exact enough to sample over 10⁶ items
        pending.clear()
        pending_factors = [f[:0] for f in pending_factors]
        pending_sq, rejections = pending_sq[:0], 0

    add_pending(first)
    while len(picks) < budget:
        if pending and (
            len(pending) >= max_pending or rejections >= max_rejections or len(stale) == 0
        ):
            fold_pending()
        if not pending and cumulative[-1] <= 0.0:
            # every remaining item coincides with a centre: any order is a valid seeding
            rest = rng.permutation(np.flatnonzero(~chosen))[: budget - len(picks)]
            picks += rest.tolist()
            scores += [0.0] * len(rest)
            break
        i = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        i = min(i, n - 1)
        if chosen[i] or stale[i] <= 0.0:
            rejections += 1
            continue
        current = stale[i]
        if pending:
            x = row(i)
            sq_norm = math.prod(float(r @ r) for r in x)
            inner = math.prod(f @ r for f, r in zip(pending_factors, x, strict=True))  # [P]
            nearest = float(np.min(sq_norm + pending_sq - 2.0 * inner))
            current = min(current, nearest if nearest > SAME_POINT_RTOL * sq_norm else 0.0)
        # accept with probability current / stale: overall ∝ the current squared distance
        if rng.random() * stale[i] >= current:
            rejections += 1
            continue
        picks.append(i)
        scores.append(math.sqrt(current))
        chosen[i] = True
        add_pending(i)
    return picks, scores


def _k_center_greedy(
    points: _Points, sq_dist: torch.Tensor, budget: int, candidates: int
) -> tuple[list[int], list[float]]:
    """Farthest-first picks from min squared distances `sq_dist` [N] to the labeled set.

    Min-distances only shrink, so stale values are upper bounds: the `candidates` largest
    are kept exact after every pick, and the best of them is the true farthest point as
    long as it is at least the largest bound outside the set (else the set is rebuilt).
    """
    n = len(points)
    seen = torch.zeros(n, dtype=torch.int64, device=sq_dist.device)  # [N] picks in sq_dist
    picked = torch.empty(budget, dtype=torch.int64, device=sq_dist.device)  # [budget]
    picks: list[int] = []
    scores: list[float] = []
    members = torch.empty(0, dtype=torch.int64, device=sq_dist.device)  # [K] candidate set
    member_points = points.rows(members)
    member_dist = sq_dist[members]  # [K] exact min squared distances of the members
    bound = math.inf  # the largest sq_dist outside the candidate set
    while len(picks) < budget:
        j = int(torch.argmax(member_dist)) if len(members) else -1
        if j < 0 or float(member_dist[j]) < bound:
            # rebuild the set from the bounds, then make its stale members exact
            if len(members):
                sq_dist[members] = member_dist
                seen[members] = len(picks)
            k = min(candidates + 1, n)
            values, members = torch.topk(sq_dist, k)
            bound = float(values[-1]) if k > candidates else -math.inf
            members = members[:candidates]
            member_points = points.rows(members)  # gathered once per rebuild, not per pick
            member_dist = sq_dist[members]
            behind = seen[members] < len(picks)  # [K]
            if behind.any():
                start = int(seen[members][behind].min())
                centres = points.rows(picked[start : len(picks)])
                exact = member_points.rows(behind).min_sq_dist(centres)
                member_dist[behind] = torch.minimum(member_dist[behind], exact)
            continue
        best = int(members[j])
        picks.append(best)
        scores.append(math.sqrt(float(member_dist[j])))
        picked[len(picks) - 1] = best
        # -inf: never picked again, so picks stay distinct even when all are at distance 0
        member_dist[j] = -math.inf
        sq_dist[best] = -math.inf
        near = member_points.min_sq_dist(points.rows(slice(best, best + 1)))  # [K]
        torch.minimum(member_dist, near, out=member_dist)
    return picks, scores


class EntropySampling(Strategy):
    """Highest predictive entropy of softmax(pool_outputs) first."""

    name = "entropy"
    tasks = frozenset({"classification"})

    @torch.inference_mode()
    def select(self, evidence: Evidence, budget: int, seed: int) -> Selection:
        self.check(evidence, budget)
        p = _probabilities(evidence.pool_outputs, _device())  # [N, C]
        entropy = torch.special.entr(p).sum(dim=1)  # [N]; entr(0) = 0, so no 0·log 0 = NaN
        return _ranked_query(evidence, entropy, budget)


class MarginSampling(Strategy):
    """Smallest gap between the two most probable classes first; score = 1 − gap."""

    name = "margin"
    tasks = frozenset({"classification"})

    @torch.inference_mode()
    def select(self, evidence: Evidence, budget: int, seed: int) -> Selection:
        self.check(evidence, budget)
        if evidence.pool_outputs.shape[1] < 2:
            raise ValueError("strategy 'margin' needs at least 2 classes")
        p = _probabilities(evidence.pool_outputs, _device())  # [N, C]
        top2 = torch.topk(p, 2, dim=1).values  # [N, 2]
        return _ranked_query(evidence, 1.0 - (top2[:, 0] - top2[:, 1]), budget)


@dataclass
class BADGE(Strategy):
    """k-means++ seeding on last-layer gradient embeddings (Ash et al., 2020).

    Score of a pick: its distance to the nearest earlier pick when it was drawn (the first
    pick: its gradient norm). The two knobs trade full passes against rejected draws; they
    change the random stream, never the distribution of the picks.
    """

    max_pending: int = 64  # picks between full passes: one matrix product folds them all in
    max_rejections: int = 8  # consecutive rejected draws that force a full pass

    name = "badge"
    tasks = frozenset({"classification"})

    @torch.inference_mode()
    def select(self, evidence: Evidence, budget: int, seed: int) -> Selection:
        self.check(evidence, budget)
        a, h = _gradient_embedding_factors(
            evidence.pool_outputs, evidence.pool_embeddings, _device()
        )
        picks, scores = _kmeans_pp_seeding(
            _Points.of(a, h),
            budget,
            np.random.default_rng(seed),
            self.max_pending,
            self.max_rejections,
        )
        return Selection(ids=evidence.pool_ids[picks], scores=np.asarray(scores, dtype=np.float32))


@dataclass
class Coreset(Strategy):
    """k-center greedy on the embeddings, from the labeled set (Sener & Savarese, 2018).

    Score of a pick: its distance to the nearest labeled item or earlier pick. With no
    labeled items the first pick is the one farthest from the pool mean.
    """

    candidates: int = 4096  # points kept exact after each pick; the rest keep upper bounds

    name = "coreset"

    @torch.inference_mode()
    def select(self, evidence: Evidence, budget: int, seed: int) -> Selection:
        self.check(evidence, budget)
        device = _device()
        pool = _Points.of(_tensor(evidence.pool_embeddings, device))  # [N, d]
        if len(evidence.labeled_ids):
            labeled = _Points.of(_tensor(evidence.labeled_embeddings, device))  # [L, d]
            sq_dist = pool.min_sq_dist(labeled)  # [N]
            picks, scores = _k_center_greedy(pool, sq_dist, budget, self.candidates)
        else:
            mean = _Points.of(pool.factors[0].mean(dim=0, keepdim=True))  # [1, d]
            from_mean = pool.min_sq_dist(mean)  # [N]
            first = int(torch.argmax(from_mean))
            sq_dist = pool.min_sq_dist(pool.rows(slice(first, first + 1)))  # [N]
            sq_dist[first] = -math.inf
            picks, scores = _k_center_greedy(pool, sq_dist, budget - 1, self.candidates)
            picks = [first, *picks]
            scores = [math.sqrt(float(from_mean[first])), *scores]
        return Selection(ids=evidence.pool_ids[picks], scores=np.asarray(scores, dtype=np.float32))
