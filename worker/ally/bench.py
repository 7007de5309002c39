"""Learning-curve benchmark: strategies × seeds on a real dataset, with a simulated oracle.

Each (strategy, seed) run starts from the same random initial labeled set for that seed,
then alternates `fit` → evaluate on the test split → `ask` → reveal the queried labels.
Results are written after every run, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from worker.ally.data import load
from worker.ally.loop import ask, evaluate, fit
from worker.ally.pdcl import PDCLConfig
from worker.ally.registry import get_strategy
from worker.ally.strategies import Strategy

PHASES = ("train", "dual_head", "embed", "select")


@dataclass(frozen=True)
class BenchSpec:
    dataset: str
    strategies: tuple[str, ...]  # "name" or "name:key=value+key=value", e.g. "ally:epsilon=auto"
    init: int = 200
    budget: int = 200
    rounds: int = 5
    seeds: int = 3
    data: str | None = None
    pool_size: int | None = None
    network: str = "auto"
    config: dict = field(default_factory=dict)  # PDCLConfig overrides shared by all strategies


def parse_strategy(spec: str) -> Strategy:
    """'ally:epsilon=auto+k=50' -> Ally(epsilon='auto', k=50); 'none' stands for None."""
    name, _, params = spec.partition(":")
    kwargs = {}
    for pair in filter(None, params.split("+")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"strategy parameter {pair!r} in {spec!r} is not key=value")
        kwargs[key] = _number(value)
    try:
        return get_strategy(name, **kwargs)
    except TypeError as error:  # an unknown parameter name
        raise ValueError(f"strategy {spec!r}: {error}") from None


def _number(text: str) -> float | int | str | None:
    if text == "none":  # e.g. ally:dual_cap_quantile=none, to switch a default off
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run(spec: BenchSpec, out: Path, log: Callable[[str], None] = print) -> dict:
    """Run every (strategy, seed) not yet in `out/results.json`; return all results."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    wanted = json.loads(json.dumps(asdict(spec)))  # as stored: tuples come back as lists
    stored = results.get("spec", wanted)
    if {**stored, "strategies": None} != {**wanted, "strategies": None}:
        raise ValueError(
            f"{path} holds results of another benchmark (only the strategies may differ); "
            "choose another --out"
        )
    # More strategies may join a finished comparison: each seed's initial set is theirs too.
    wanted["strategies"] = list(dict.fromkeys([*stored["strategies"], *spec.strategies]))
    strategies = {name: parse_strategy(name) for name in spec.strategies}
    config = PDCLConfig(**spec.config)
    runs = results.get("runs", [])
    done = {(r["strategy"], r["seed"]) for r in runs}
    for seed in range(spec.seeds):
        if all((name, seed) in done for name in strategies):
            continue
        train_set, test_set = load(spec.dataset, spec.data, seed=seed)
        rng = np.random.default_rng(seed)
        pool_rows = np.arange(len(train_set.y))
        if spec.pool_size and spec.pool_size < len(pool_rows):
            pool_rows = np.sort(rng.choice(pool_rows, spec.pool_size, replace=False))
        initial = rng.choice(pool_rows, spec.init, replace=False)
        for name, strategy in strategies.items():
            if (name, seed) in done:
                continue
            record = _run_one(
                strategy, name, seed, spec, config, train_set, test_set, pool_rows, initial, log
            )
            runs.append(record)
            results = {
                "dataset": spec.dataset,
                "task": train_set.task,
                "metric": "accuracy" if train_set.task == "classification" else "mse",
                "spec": wanted,
                "runs": runs,
            }
            path.write_text(json.dumps(results, indent=1))
    return results


def _run_one(strategy, name, seed, spec, config, train_set, test_set, pool_rows, initial, log):
    task = train_set.task
    num_outputs = len(train_set.classes) if task == "classification" else 1
    labeled = np.asarray(initial)
    unlabeled = np.setdiff1d(pool_rows, labeled)
    record = {"strategy": name, "seed": seed, "labeled": [], "metric": [], "seconds": {}}
    seconds = {phase: [] for phase in PHASES}
    for round_index in range(spec.rounds + 1):
        round_seed = seed * 1000 + round_index
        x, y = train_set.x[labeled], train_set.y[labeled]
        test_y, scale = test_set.y, 1.0
        if task == "regression":
            # As the service does: targets in units of the labeled items' spread, since the
            # labels of the rest are hidden (ε = 0.1 is measured in these units).
            y, test_y, scale = _standardize_by(y, test_y)
        trained, train_seconds = fit(
            strategy, task, x, y, labeled, round_seed, spec.network, num_outputs, config
        )
        metric = evaluate(trained.model, task, test_set.x, test_y)
        value = (
            metric["accuracy"]
            if task == "classification"
            else test_set.mse(metric["mse"] * scale**2)
        )
        record["labeled"].append(len(labeled))
        record["metric"].append(value)
        spent = {"train": train_seconds}
        if round_index < spec.rounds:
            query, asked = ask(
                strategy, trained, task, x, labeled, train_set.x[unlabeled], unlabeled,
                spec.budget, round_seed,
            )  # fmt: skip
            spent.update(asked)
            labeled = np.concatenate([labeled, query.ids])  # the oracle reveals their labels
            unlabeled = np.setdiff1d(unlabeled, query.ids)
        for phase in PHASES:
            seconds[phase].append(round(spent.get(phase, 0.0), 4))
        log(
            f"{name:>24} seed {seed} labeled {len(record['labeled']) and record['labeled'][-1]:>6}"
            f"  {'accuracy' if task == 'classification' else 'mse'} {value:.4f}  "
            + " ".join(f"{k} {v:.2f}s" for k, v in spent.items())
        )
    record["seconds"] = seconds
    return record


def _standardize_by(
    labeled_y: torch.Tensor, test_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Both target sets re-standardized with the labeled targets' mean and std, and that std."""
    mean, std = labeled_y.mean(), labeled_y.std(correction=0).clamp_min(1e-6)
    return (labeled_y - mean) / std, (test_y - mean) / std, float(std)


def summarize(results: dict) -> list[dict]:
    """Per strategy: mean final metric, labels to reach 97% of the best final, area under curve.

    The target is shared: 97% of the best strategy's final mean accuracy (for MSE, that final
    MSE divided by 0.97), so "labels needed" compares strategies on one bar (paper §5.2).
    """
    higher_is_better = results["metric"] == "accuracy"
    curves = {}
    for name in dict.fromkeys(r["strategy"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["strategy"] == name]
        length = min(len(r["metric"]) for r in runs)
        labeled = np.array(runs[0]["labeled"][:length], dtype=float)
        metric = np.array([r["metric"][:length] for r in runs])
        curves[name] = (labeled, metric.mean(0), metric.std(0), len(runs), runs)
    finals = [curve[1][-1] for curve in curves.values()]
    best = max(finals) if higher_is_better else min(finals)
    target = 0.97 * best if higher_is_better else best / 0.97
    rows = []
    for name, (labeled, mean, std, seeds, runs) in curves.items():
        reached = mean >= target if higher_is_better else mean <= target
        rows.append(
            {
                "strategy": name,
                "seeds": seeds,
                "final": float(mean[-1]),
                "final_std": float(std[-1]),
                "labels_to_target": _first_crossing(labeled, mean, target)
                if reached.any()
                else None,
                "target": float(target),
                "auc": float(np.trapezoid(mean, labeled) / (labeled[-1] - labeled[0]))
                if len(labeled) > 1
                else float(mean[0]),
                "seconds_per_round": {
                    phase: float(np.mean([np.mean(r["seconds"][phase]) for r in runs]))
                    for phase in PHASES
                },
            }
        )
    return rows


def _first_crossing(labeled: np.ndarray, mean: np.ndarray, target: float) -> float:
    """Labels at which the mean curve first reaches `target`, interpolated linearly."""
    sign = 1 if mean[-1] >= mean[0] else -1  # accuracy rises, MSE falls
    above = sign * (mean - target) >= 0
    i = int(np.argmax(above))
    if i == 0:
        return float(labeled[0])
    a, b = mean[i - 1], mean[i]
    return float(labeled[i - 1] + (target - a) / (b - a) * (labeled[i] - labeled[i - 1]))


def table(rows: list[dict], metric: str) -> str:
    """The summary as a Markdown table."""
    lines = [
        f"| strategy | seeds | final {metric} | labels to 97% target | AUC | "
        "train s | dual head s | embed s | select s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reached = row["labels_to_target"]
        t = row["seconds_per_round"]
        lines.append(
            f"| {row['strategy']} | {row['seeds']} | {row['final']:.4f} ± {row['final_std']:.4f} | "
            f"{'not reached' if reached is None else f'{reached:.0f}'} | {row['auc']:.4f} | "
            f"{t['train']:.2f} | {t['dual_head']:.2f} | {t['embed']:.2f} | {t['select']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path, strategies: Sequence[str] | None = None) -> None:
    """Mean ± std learning curve per strategy (all, or those named), like the paper's Figure 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(strategies or dict.fromkeys(r["strategy"] for r in results["runs"]))
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for index, name in enumerate(names):
        runs = [r for r in results["runs"] if r["strategy"] == name]
        length = min(len(r["metric"]) for r in runs)
        labeled = np.array(runs[0]["labeled"][:length])
        metric = np.array([r["metric"][:length] for r in runs])
        mean, std = metric.mean(0), metric.std(0)
        color = colors[index % len(colors)]
        label = f"{name} ({len(runs)} seeds)"
        ax.plot(labeled, mean, marker="o", markersize=3, color=color, label=label)
        ax.fill_between(labeled, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xlabel("labeled samples")
    ax.set_ylabel("test accuracy" if results["metric"] == "accuracy" else "test MSE")
    ax.set_title(f"{results['dataset']}: learning curves (mean ± std)")
    ax.grid(alpha=0.3)
    # Beside the axes: strategy specs are long, and many curves end close together.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
