"""Selection-cost benchmark: each strategy's `select` alone, on synthetic pool embeddings.

    .venv/bin/python -m worker.bench_selection

Each case (strategy, pool size, budget) runs in a fresh subprocess so that cases cannot
share caches or a memory high-water mark. The child builds the pool, warms the strategy up
on a tiny pool (thread pools, lazy imports), then measures `select`: wall and CPU seconds,
and peak RSS above the RSS just before the call (Linux resets the peak counter through
/proc/self/clear_refs, so the pool's own construction does not count).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from worker.ally.strategies import Evidence, Strategy

DIM = 128
CLASSES = 10
PREFERRED_ORDER = ["random", "entropy", "margin", "badge", "coreset", "ally"]
REPEAT_SECONDS = 20.0


def synthetic_evidence(
    pool: int, labeled: int, seed: int = 0, dim: int = DIM, classes: int = CLASSES
) -> Evidence:
    """A Gaussian-mixture pool, ReLU embeddings [N, d] and linear logits [N, C], built in chunks.

    Chunks keep the construction's peak near the final arrays' size, so the measured
    memory belongs to `select` and not to leftovers of the data generator.
    """
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.standard_normal((classes, dim), dtype=np.float32)  # [C, d]
    head = rng.standard_normal((dim, classes), dtype=np.float32) / np.sqrt(dim)  # [d, C]
    total = pool + labeled
    embeddings = np.empty((total, dim), dtype=np.float32)  # [L + N, d]
    logits = np.empty((total, classes), dtype=np.float32)  # [L + N, C]
    step = 65_536
    for start in range(0, total, step):
        stop = min(start + step, total)
        rows = embeddings[start:stop]
        rng.standard_normal(rows.shape, dtype=np.float32, out=rows)
        rows += means[rng.integers(classes, size=stop - start)]
        np.maximum(rows, 0.0, out=rows)
        np.matmul(rows, 2.0 * head, out=logits[start:stop])
    return Evidence(
        task="classification",
        labeled_ids=np.arange(labeled),
        labeled_embeddings=embeddings[:labeled],
        duals=rng.exponential(size=labeled).astype(np.float32),
        pool_ids=np.arange(labeled, total),
        pool_embeddings=embeddings[labeled:],
        pool_outputs=logits[labeled:],
        labeled_outputs=logits[:labeled],
    )


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS counter to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure(
    chosen: Strategy, pool: int, budget: int, labeled: int, repeats: int = 3, seed: int = 0
) -> dict:
    """Time and peak extra memory of `select`, in this process: the best of `repeats` calls.

    The best run is the least disturbed by other jobs on a shared machine; calls stop early
    once they have taken REPEAT_SECONDS in all, so a slow case runs once.
    """
    import torch  # imported here so the parent process stays light

    strategy = chosen.name
    evidence = synthetic_evidence(pool, labeled, seed)
    chosen.select(synthetic_evidence(2_000, 100, seed + 1), 10, seed)  # warm-up
    walls: list[float] = []
    cpus: list[float] = []
    extra_kib = 0
    while len(walls) < repeats and sum(walls) < REPEAT_SECONDS:
        gc.collect()
        exact_peak = _reset_peak_rss()
        before_kib = _status_kib("VmRSS") if exact_peak else 0
        before_max_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        wall, cpu = time.perf_counter(), time.process_time()
        query = chosen.select(evidence, budget, seed)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        if exact_peak:
            extra_kib = max(extra_kib, _status_kib("VmHWM") - before_kib)
        else:  # ru_maxrss is a lifetime maximum: a lower bound unless this call sets it
            after_max_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            extra_kib = max(extra_kib, after_max_kib - before_max_kib)
        distinct = len(np.unique(np.asarray(query.ids)))
        if len(query.ids) != budget or distinct != budget:
            raise RuntimeError(f"{strategy} returned {distinct} distinct ids, not {budget}")
    return {
        "strategy": strategy,
        "pool": pool,
        "budget": budget,
        "labeled": labeled,
        "seconds": round(min(walls), 3),
        "cpu_seconds": round(cpus[walls.index(min(walls))], 3),
        "runs": len(walls),
        "all_seconds": [round(w, 3) for w in walls],
        "peak_extra_mb": round(extra_kib / 1024, 1),
        "peak_measure": "VmHWM after clear_refs" if exact_peak else "ru_maxrss delta",
        "torch_threads": torch.get_num_threads(),
    }


def run_case(strategy: str, pool: int, budget: int, labeled: int, timeout: float) -> dict:
    """`measure` in a fresh interpreter; failures and timeouts become an `error` entry."""
    command = [
        sys.executable,
        "-m",
        "worker.bench_selection",
        "--case",
        f"{strategy},{pool},{budget}",
        "--labeled",
        str(labeled),
    ]
    case = {"strategy": strategy, "pool": pool, "budget": budget, "labeled": labeled}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**case, "error": last[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_strategies() -> list[str]:
    from worker.ally.registry import STRATEGIES

    known = [name for name in PREFERRED_ORDER if name in STRATEGIES]
    return known + sorted(set(STRATEGIES) - set(known))


CELL_FORMATS = {
    "seconds": "{:.3f}",
    "cpu_seconds": "{:.3f}",
    "runs": "{}",
    "peak_extra_mb": "{:.1f}",
}


def _cell(result: dict, key: str) -> str:
    return "—" if "error" in result else CELL_FORMATS[key].format(result[key])


def table(results: list[dict]) -> str:
    lines = [
        "| strategy | pool | budget | seconds | CPU seconds | runs | peak extra MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        row = [r["strategy"], f"{r['pool']:,}", f"{r['budget']:,}"]
        row += [_cell(r, key) for key in ("seconds", "cpu_seconds", "runs", "peak_extra_mb")]
        if "error" in r:
            row[-1] += f" ({r['error']})"
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def report(results: list[dict], command: str, args: argparse.Namespace) -> str:
    largest = max(args.sizes)
    pool_mb = largest * (DIM + CLASSES) * 4 / 2**20
    return f"""# Selection cost per strategy

Regenerate (about {args.minutes_hint} minutes on 2 CPU cores):

```
{command}
```

What is measured: each strategy's `select` alone (no training, no prediction).

- Pool: synthetic, ReLU embeddings of a 10-component Gaussian mixture (d = {DIM}) and logits
  of a random linear head (C = {CLASSES}); {args.labeled:,} labeled items (Coreset starts
  from them; ALLY fits its dual head on them and their random duals).
- One fresh process per case, warmed up on a tiny pool; then `select` is called up to 3
  times, fewer once the calls have taken {REPEAT_SECONDS:.0f} s in all (**runs**).
- **seconds**: the best wall-clock time of those calls (the least disturbed by other jobs);
  **CPU seconds**: user + system time of the process during that call (2 threads: up to
  twice the wall time).
- **peak extra MB** (MiB): the largest peak RSS during a call above the RSS just before it
  (Linux `VmHWM`, reset through `/proc/self/clear_refs`); the pool's own arrays, {pool_mb:,.0f}
  MB at {largest:,} items, are not counted.
- Machine: {_cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch
  on CPU; measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Other jobs shared the machine:
  1-minute load average {args.load[0]:.1f} at the start and {args.load[1]:.1f} at the end
  (2 cores), and single calls can vary 3× between repeats.

{table(results)}

How the baselines keep the cost linear in the pool (`worker/ally/baselines.py`):

- entropy, margin: one softmax over [N, C] and an O(N) partial sort.
- badge: the gradient embeddings `(onehot(ŷ) − p) ⊗ h` are never formed; distances use
  `‖a⊗h − a'⊗h'‖² = ‖a‖²‖h‖² + ‖a'‖²‖h'‖² − 2(a·a')(h·h')`, so memory is O(N·(C + d)).
  Exact k-means++ needs every item's distance to every centre, O(N·budget·(C + d)) flops;
  they are computed as one blocked matrix product per 64 picks instead of one pass per
  pick, and in between a draw from the stale distances is accepted with probability
  current / stale, which keeps the sampling exactly ∝ the current squared distance.
- coreset: min-distances to the labeled set in blocks of rows × centres (O(N·L·d) flops,
  the bulk of its time here); then farthest-first, where only the 4,096 largest distances
  (upper bounds for the rest) are kept exact, so a pick costs O(4,096·d), not O(N·d).
- ally is the engine's `Ally` with its defaults (dual head fit, then MiniBatchKMeans with
  k = budget over the pool), measured as it is.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="60000,1000000", help="pool sizes")
    parser.add_argument("--budgets", default="200,1000")
    parser.add_argument("--strategies", default=None, help="default: every registered one")
    parser.add_argument("--labeled", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/selection"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child: "strategy,pool,budget"
    args = parser.parse_args()

    if args.case:
        strategy, pool, budget = args.case.split(",")
        from worker.ally.registry import get_strategy

        chosen = get_strategy(strategy)
        print(json.dumps(measure(chosen, int(pool), int(budget), args.labeled)))
        return

    args.sizes = [int(s) for s in args.sizes.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    strategies = args.strategies.split(",") if args.strategies else default_strategies()
    command = ".venv/bin/python -m worker.bench_selection " + shlex.join(sys.argv[1:])
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    results = []
    for pool in args.sizes:
        for budget in budgets:
            for strategy in strategies:
                result = run_case(strategy, pool, budget, args.labeled, args.timeout)
                results.append(result)
                shown = result.get("error") or (
                    f"{result['seconds']:8.2f} s  {result['cpu_seconds']:8.2f} CPU s  "
                    f"{result['peak_extra_mb']:8.1f} MB"
                )
                print(f"{strategy:>8} {pool:>9,} {budget:>5,}  {shown}", flush=True)
    args.minutes_hint = max(1, round((time.perf_counter() - started) / 60))
    args.load = (load_at_start, os.getloadavg()[0])
    print()
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command.strip(),
        "dim": DIM,
        "classes": CLASSES,
        "labeled": args.labeled,
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"start": args.load[0], "end": args.load[1]},
        "measured_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results,
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(report(results, command.strip(), args))


if __name__ == "__main__":
    main()
