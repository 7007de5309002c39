"""Wall time of one ALLY round on full MNIST, phase by phase (the engine alone, no service).

    .venv/bin/python -m worker.bench_round [--data ../shared/data/mnist] [--labeled 2000]

A 60,000-image pool, `labeled` of them labeled at random, budget 200: train (PDCL), embed
the pool, fit the dual head, cluster and select. Each repeat uses another seed; the table
shows every repeat and the median. Writes docs/benchmarks/round.json and round.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from worker.ally.data import load
from worker.ally.loop import run_round
from worker.ally.select import Ally

PHASES = ("train", "embed", "dual_head", "select")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--labeled", type=int, default=2000)
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()

    train_set, _ = load("mnist", args.data)
    rows = []
    for seed in range(args.repeats):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(train_set.y))
        labeled, pool = order[: args.labeled], order[args.labeled :]
        started = time.perf_counter()
        result = run_round(
            Ally(), "classification", train_set.x[labeled], train_set.y[labeled], labeled,
            train_set.x[pool], pool, args.budget, seed, network="mlp", num_outputs=10,
        )  # fmt: skip
        total = time.perf_counter() - started
        row = {phase: result.seconds.get(phase, 0.0) for phase in PHASES}
        row |= {"total": total, "epochs": len(result.trained.history), "seed": seed}
        rows.append(row)
        print(" ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)

    median = {key: float(np.median([r[key] for r in rows])) for key in (*PHASES, "total")}
    report = {
        "what": f"one ALLY round: MNIST pool of {len(train_set.y)}, {args.labeled} labeled, "
        f"budget {args.budget}, MLP 784-256-256-10, CPU",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "repeats": rows,
        "median": median,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "round.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# One ALLY round, phase by phase",
        "",
        "```",
        ".venv/bin/python -m worker.bench_round --data ../shared/data/mnist",
        "```",
        "",
        f"{report['what']}; {report['machine']}; measured {report['measured']}.",
        "",
        "| seed | epochs | train s | embed s | dual head s | select s | total s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['epochs']} | {r['train']:.2f} | {r['embed']:.2f} | "
            f"{r['dual_head']:.2f} | {r['select']:.2f} | {r['total']:.2f} |"
        )
    m = median
    lines.append(
        f"| median | | {m['train']:.2f} | {m['embed']:.2f} | {m['dual_head']:.2f} | "
        f"{m['select']:.2f} | {m['total']:.2f} |"
    )
    (args.out / "round.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
