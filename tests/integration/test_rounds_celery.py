"""Rounds through the whole deployment: the API over HTTP, Redis, PostgreSQL, Celery workers.

Everything is real and runs in subprocesses (tests/integration/deployment.py), on a database
and a Redis database number of this module's own.
"""

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.integration.deployment import (
    Deployment,
    answer_queries,
    assert_finished_once,
    claim_redis_db,
    create_pool,
    deploy,
    query_items,
    round_in_training,
    start_round,
    stored_labels,
)
from tests.processes import children
from worker.demo import Annotator

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    # Our own database and Redis number: other test runs on this machine keep theirs.
    redis_server = redis_url.rsplit("/", 1)[0]
    redis_db = claim_redis_db(redis_server)
    tmp: Path = tmp_path_factory.mktemp("deployment")
    try:
        with deploy(postgres_url, f"ally_it_{os.getpid()}", f"{redis_server}/{redis_db}", tmp) as d:
            yield d
    finally:
        redis.Redis.from_url(f"{redis_server}/{redis_db}").flushdb()


def test_two_rounds_over_http_cold_start_then_trained(
    deployment: Deployment,
    workers: Callable[[str], subprocess.Popen],
    annotator: Annotator,
) -> None:
    workers("worker-loop")
    pool_id = create_pool(deployment, "loop", {"network": "mlp"})

    first = start_round(deployment, pool_id, budget=30)
    assert first["seeding"] == "kmeans-coverage" and first["status"] == "queued"
    first = deployment.wait_round(first["id"], "ready", timeout=90)
    assert first["metrics"] == {"labeled": 0} and first["attempts"] == 1
    cold = query_items(deployment, first["id"])
    assert len(cold) == len(set(cold)) == 30
    labeled = answer_queries(deployment, annotator, first["id"], "alice")
    assert len(labeled) == 30

    second = start_round(deployment, pool_id, budget=20)
    assert second["seeding"] is None and second["labeled_at_start"] == 30
    second = deployment.wait_round(second["id"], "ready", timeout=90)
    metrics = second["metrics"]
    assert metrics["labeled"] == 30 and metrics["holdout"] == 359
    assert 0.4 < metrics["accuracy"] <= 1.0  # 30 digits teach an MLP far more than chance
    assert second["percent"] == 100 and {"train", "embed", "select"} <= set(second["timings"])
    trained = query_items(deployment, second["id"])
    assert len(trained) == len(set(trained)) == 20 and not set(trained) & set(cold)
    curve = deployment.api.get(f"/pools/{pool_id}/learning-curve").json()
    assert [(p["number"], p["labeled"]) for p in curve["points"]] == [(1, 0), (2, 30)]
    assert curve["points"][1]["value"] == metrics["accuracy"]


def test_a_worker_killed_mid_round_is_replaced_and_the_round_completes_once(
    deployment: Deployment,
    workers: Callable[[str], subprocess.Popen],
    annotator: Annotator,
) -> None:
    training = round_in_training(deployment, workers, annotator, "killed")
    round_id = training.round_id
    first_claim = deployment.row(round_id).claimed_by
    os.killpg(training.worker.pid, signal.SIGKILL)  # the worker and its pool process, at once
    training.worker.wait(timeout=30)
    interrupted = deployment.round(round_id)
    assert interrupted["status"] == "running" and interrupted["attempts"] == 1

    # Annotators keep working while no worker runs: a second opinion on round 1's items.
    second_opinion = answer_queries(deployment, annotator, training.cold_round_id, "bob")
    acknowledged = training.labeled + second_opinion
    workers("worker-second")

    # One query set, although two workers ran the round.
    assert_finished_once(deployment, round_id, attempts=2)
    assert deployment.row(round_id).claimed_by not in (None, first_claim)
    assert set(acknowledged) <= stored_labels(deployment, training.pool_id)
    assert len(acknowledged) == 80


def test_a_pool_process_killed_mid_round_is_replaced_and_the_round_completes_once(
    deployment: Deployment,
    workers: Callable[[str], subprocess.Popen],
    annotator: Annotator,
) -> None:
    """The kernel's OOM killer takes the process running the round, not the worker."""
    training = round_in_training(deployment, workers, annotator, "oom")
    worker = training.worker
    [child] = children(worker.pid)
    os.kill(child, signal.SIGKILL)
    # The worker requeues the task (reject on worker lost) and forks a new pool process; the
    # round is claimed again once its lease has run out, through that redelivery (if the new
    # process gets to it late enough) or else through the sweeper's.
    assert_finished_once(deployment, training.round_id, attempts=2)
    assert worker.poll() is None, "the worker itself lives on"
    assert child not in children(worker.pid) and len(children(worker.pid)) == 1
