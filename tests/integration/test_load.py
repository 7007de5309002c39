"""The load test's harness (worker/bench_load.py), for a few seconds: two API processes on
PostgreSQL under 32 connections answer every GET /queries/{round} and POST /labels with a
2xx, and store every label they acknowledge. Throughput is the benchmark's business, not
the tests': nothing here depends on timing."""

import os
from pathlib import Path

import pytest

from tests.conftest import require_command
from worker.bench_load import WRK_INSTALL, load_setup, run_plan, wrk

pytestmark = pytest.mark.integration


def test_under_load_every_request_succeeds_and_every_acknowledged_label_is_stored(
    postgres_url: str, tmp_path: Path
) -> None:
    require_command("wrk", WRK_INSTALL)
    database = f"ally_load_{os.getpid()}"
    with load_setup(postgres_url, database, workers=2, queries=200, tmp=tmp_path) as setup:
        # The harness sees failures: an unknown key gets a 401 on every request.
        refused = wrk(setup, "queries", 1, connections=4, threads=1, keys=["ally_not-a-key"])
        assert refused["requests"] > 0
        assert refused["status"]["4xx"] == refused["failed"] == refused["requests"]

        # A slow answer is the benchmark's business; here only a wrong or missing one fails.
        result = run_plan(setup, seconds=2, connections=32, threads=2, warmup=0, timeout=10)
        stored = setup.labels_in_database()

    assert [p["route"] for p in result["phases"]] == [
        "healthz",
        "queries",
        "healthz",
        "labels",
        "healthz",
    ]
    for phase in result["phases"]:
        assert phase["requests"] > 0
        assert phase["failed"] == 0, phase  # socket errors, timeouts, non-2xx answers
        assert phase["status"]["2xx"] == phase["requests"]
    [labels] = [p for p in result["phases"] if p["route"] == "labels"]
    # Each acknowledged label is a new row (no repeats), and stored; those sent but still
    # in flight when wrk stopped may be stored too.
    assert labels["created"] == labels["status"]["2xx"]
    assert labels["status"]["2xx"] <= stored <= labels["sent"]
