"""How well ALLY's predicted duals point at the items the model gets wrong, against margin.

    .venv/bin/python -m worker.bench_dual_head [--data ../shared/data/mnist] [--labeled 400,800]

On full MNIST, for each labeled-set size: train with PDCL (ε = auto) on random labeled
items, then score 20,000 unlabeled items three ways: the dual head on the embedding alone
(the paper), the dual head on the embedding and the sorted class probabilities
(`confidence`), and the negated margin. Reported for each: Spearman correlation with the
items' true loss (their labels are hidden from every score), and the share of misclassified
items among the 200 picks of one-per-cluster selection over 200 k-means clusters.
Writes docs/benchmarks/dual_head.json and dual_head.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from worker.ally.data import load
from worker.ally.dual_head import fit_dual_head
from worker.ally.loop import fit, gather_evidence
from worker.ally.select import Ally, cluster, diverse_top, head_inputs

POOL, BUDGET = 20_000, 200


def measure(train_set, labeled_count: int, seed: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    labeled = rng.choice(len(train_set.y), labeled_count, replace=False)
    pool = rng.choice(np.setdiff1d(np.arange(len(train_set.y)), labeled), POOL, replace=False)
    strategy = Ally(epsilon="auto")
    x, y = train_set.x[labeled], train_set.y[labeled]
    trained, _ = fit(strategy, "classification", x, y, labeled, seed, num_outputs=10)
    evidence = gather_evidence(trained, "classification", x, labeled, train_set.x[pool], pool)
    logits = torch.as_tensor(evidence.pool_outputs)
    truth = train_set.y[pool]
    true_loss = F.cross_entropy(logits, truth, reduction="none").numpy()
    wrong = (logits.argmax(1) != truth).numpy()
    top2 = logits.softmax(1).topk(2).values.numpy()

    def head(with_confidence: bool) -> np.ndarray:
        labeled_in, pool_in = evidence.labeled_embeddings, evidence.pool_embeddings
        if with_confidence:
            labeled_in = head_inputs(labeled_in, evidence.labeled_outputs, "classification")
            pool_in = head_inputs(pool_in, evidence.pool_outputs, "classification")
        return fit_dual_head(labeled_in, evidence.duals, seed).predict(pool_in)

    clusters = cluster(evidence.pool_embeddings, BUDGET, seed)
    scores = {
        "dual head, embedding": head(False),
        "dual head, embedding + confidence": head(True),
        "margin": top2[:, 1] - top2[:, 0],  # minus the top-2 gap: a small gap ranks first
    }
    return {
        name: {
            "spearman_true_loss": float(spearmanr(score, true_loss)[0]),
            "wrong_share_one_per_cluster": float(
                wrong[diverse_top(score, clusters, BUDGET, BUDGET)].mean()
            ),
        }
        for name, score in scores.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--labeled", default="400,600,800")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    train_set, _ = load("mnist", args.data)
    results = {
        int(count): measure(train_set, int(count), args.seed) for count in args.labeled.split(",")
    }
    lines = [
        "# Predicted duals against margin, full MNIST",
        "",
        "```sh",
        ".venv/bin/python -m worker.bench_dual_head",
        "```",
        "",
        f"Seed {args.seed}; {POOL:,} unlabeled items scored; one pick per cluster of "
        f"{BUDGET} k-means clusters. See `worker/bench_dual_head.py` for the protocol.",
        "",
        "| labeled | score | Spearman with true loss | wrong picks, one per cluster |",
        "|---|---|---|---|",
    ]
    for count, by_score in results.items():
        for name, figures in by_score.items():
            lines.append(
                f"| {count} | {name} | {figures['spearman_true_loss']:.2f} | "
                f"{figures['wrong_share_one_per_cluster']:.0%} |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dual_head.json").write_text(json.dumps(results, indent=1))
    (args.out / "dual_head.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
