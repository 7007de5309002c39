"""The learning-curve benchmark: its results file, its summary, and resuming a cut-off run."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from worker.ally.bench import BenchSpec, run, summarize

SPEC = BenchSpec(
    dataset="digits", strategies=("ally", "random"), init=40, budget=30, rounds=2, seeds=2
)


def test_results_have_one_curve_per_strategy_and_seed(tmp_path: Path) -> None:
    results = run(SPEC, tmp_path, log=lambda line: None)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored == results
    assert (results["dataset"], results["task"], results["metric"]) == (
        "digits",
        "classification",
        "accuracy",
    )
    assert sorted((r["strategy"], r["seed"]) for r in results["runs"]) == [
        ("ally", 0), ("ally", 1), ("random", 0), ("random", 1)
    ]  # fmt: skip
    for record in results["runs"]:
        assert record["labeled"] == [40, 70, 100]
        assert all(0 <= m <= 1 for m in record["metric"])
        assert set(record["seconds"]) == {"train", "dual_head", "embed", "select"}
    rows = {row["strategy"]: row for row in summarize(results)}
    assert rows.keys() == {"ally", "random"}
    assert max(row["final"] for row in rows.values()) * 0.97 == pytest.approx(
        rows["ally"]["target"]
    )


def test_a_cut_off_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    first = run(replace(SPEC, seeds=2), tmp_path, log=lambda line: None)
    # Drop the last (strategy, seed), as if the run had been killed before it.
    path = tmp_path / "results.json"
    kept = {**first, "runs": first["runs"][:-1]}
    path.write_text(json.dumps(kept))
    lines: list[str] = []
    resumed = run(SPEC, tmp_path, log=lines.append)
    assert resumed["runs"][:-1] == kept["runs"]  # the finished runs are not redone
    assert len(lines) == SPEC.rounds + 1  # only the missing run trained
    for field in ("strategy", "seed", "labeled", "metric"):  # and it is reproducible
        assert resumed["runs"][-1][field] == first["runs"][-1][field]


def test_a_strategy_joins_a_finished_comparison_but_another_benchmark_is_refused(
    tmp_path: Path,
) -> None:
    small = replace(SPEC, strategies=("random",), seeds=1, rounds=1)
    first = run(small, tmp_path, log=lambda line: None)
    lines: list[str] = []
    joined = run(replace(small, strategies=("ally",)), tmp_path, log=lines.append)
    assert joined["spec"]["strategies"] == ["random", "ally"]
    assert joined["runs"][0] == first["runs"][0]
    assert [r["strategy"] for r in joined["runs"]] == ["random", "ally"]
    assert len(lines) == small.rounds + 1  # random was not run again
    with pytest.raises(ValueError, match="another benchmark"):
        run(replace(small, budget=10), tmp_path, log=lambda line: None)
