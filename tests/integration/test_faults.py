"""Faults with real processes: Redis restarted, the API killed, PostgreSQL connections dropped.

Each test breaks something while a round trains on a Celery worker and annotators post labels
through the API, then checks what the issue asks of the service: the round finishes exactly
once (one query set, no extra attempt), every label acknowledged with a 2xx is stored, and
clients see only the errors the fault explains. The deployment has a Redis server of its own
(the shared one on 6379 is never touched) and a database of its own, the only one whose
connections are dropped. A worker killed mid-round is tested in test_rounds_celery.py.
"""

import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import text

from service.db import make_engine
from service.models import RoundStatus, utcnow
from tests.conftest import require_command
from tests.integration.deployment import (
    LONG_TRAINING,
    Deployment,
    assert_finished_once,
    create_pool,
    deploy,
    free_port,
    round_in_training,
    start_round,
    stored_labels,
)
from tests.processes import wait_for
from worker.demo import Annotator

pytestmark = pytest.mark.integration

# Redis stays down this long; the round trains longer than that (about 6 s on a quiet machine).
OUTAGE_SECONDS = 2
LONGER_TRAINING = LONG_TRAINING | {"training": LONG_TRAINING["training"] | {"max_epochs": 3000}}


@dataclass
class RedisServer:
    """A redis-server of the test's own, without persistence: a restart loses every message."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *("redis-server", "--bind", "127.0.0.1", "--port", str(self.port)),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def answers() -> bool:
            assert self.process is not None and self.process.poll() is None, "redis-server died"
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_for(answers, 30, "redis-server", every=0.05)
        finally:
            client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_command("redis-server", "apt-get install redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def deployment(
    postgres_url: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("faults")
    with deploy(postgres_url, f"ally_faults_{os.getpid()}", redis_server.url, tmp) as deployment:
        yield deployment


@dataclass
class Attempt:
    """One POST /labels: when it ended, its status (None: no answer) or error, and the
    Retry-After header it carried."""

    at: float
    status: int | None
    error: str = ""
    retry_after: str | None = None


class Annotators:
    """Threads that post labels through the API without pause, as annotators at work do.

    Every post gives its labels under an annotator name of its own, so that each acknowledged
    label is a row to find afterwards. A post answered 503, or lost to a connection error, is
    sent again (labels are idempotent) until it is acknowledged.
    """

    def __init__(
        self, deployment: Deployment, labeled: list[tuple[int, str, str]], threads: int = 2
    ) -> None:
        self.base_url = deployment.annotator.base_url
        self.headers = dict(deployment.annotator.headers)
        self.answers = [(item, value) for item, value, _ in labeled]  # given again and again
        self.acknowledged: list[tuple[float, tuple[int, str, str]]] = []
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._label, args=(n,), name=f"annotator-{n}")
            for n in range(threads)
        ]

    def __enter__(self) -> "Annotators":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def labels(self) -> set[tuple[int, str, str]]:
        return {label for _, label in self.acknowledged}

    def flowing_since(self, since: float, count: int = 20) -> None:
        """Wait until `count` labels were acknowledged after `since` (time.monotonic())."""
        wait_for(
            lambda: sum(at > since for at, _ in self.acknowledged) >= count,
            60,
            f"{count} labels acknowledged",
            every=0.05,
        )

    def failures(self) -> list[Attempt]:
        return [a for a in self.attempts if a.status != 200]

    def _label(self, thread: int) -> None:
        batch = 4
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30) as client:
            for post in itertools.count():
                if self._stop.is_set():
                    return
                start = post * batch % len(self.answers)
                labels = [
                    {"item_id": item, "value": value, "annotator": f"a{thread}-{post}"}
                    for item, value in (self.answers * 2)[start : start + batch]
                ]
                self._post_until_acknowledged(client, labels)
                time.sleep(0.02)  # leave the round some of the two cores

    def _post_until_acknowledged(self, client: httpx.Client, labels: list[dict]) -> None:
        while not self._stop.is_set():
            try:
                response = client.post("/labels", json=labels)
            except httpx.TransportError as error:
                self.attempts.append(Attempt(time.monotonic(), None, type(error).__name__))
                time.sleep(0.05)
                continue
            self.attempts.append(
                Attempt(
                    time.monotonic(),
                    response.status_code,
                    _code(response),
                    response.headers.get("retry-after"),
                )
            )
            if response.status_code == 200:
                now = time.monotonic()
                self.acknowledged.extend(
                    (now, (label["item_id"], label["value"], label["annotator"]))
                    for label in labels
                )
                return
            if response.status_code != 503:
                return  # the test fails on it: nothing else is expected
            time.sleep(0.05)


def _code(response: httpx.Response) -> str:
    """The service's error code, or the start of a body that is not one of its errors."""
    if response.is_success:
        return ""
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:80]


def seconds_since(start: datetime, end: datetime | None) -> float:
    assert end is not None
    return round((end - start).total_seconds(), 1)


def report(fault: str, **figures: object) -> None:
    """One line of figures for docs/reliability.md (shown with `pytest -rP`)."""
    print(f"{fault}: " + ", ".join(f"{name} {value}" for name, value in figures.items()))


def test_an_api_killed_mid_round_restarts_and_loses_no_acknowledged_label(
    deployment: Deployment, workers: Callable[[str], subprocess.Popen], annotator: Annotator
) -> None:
    training = round_in_training(deployment, workers, annotator, "api")
    pool_id, round_id = training.pool_id, training.round_id
    with Annotators(deployment, training.labeled) as annotators:
        annotators.flowing_since(time.monotonic())
        assert deployment.row(round_id).status == RoundStatus.running
        killed = time.monotonic()
        deployment.kill_api()  # SIGKILL: requests in flight get no answer
        deployment.start_api()  # same port; returns once /readyz answers 200
        back = time.monotonic()
        annotators.flowing_since(back)

    assert_finished_once(deployment, round_id)  # the worker never noticed
    assert annotators.labels() <= stored_labels(deployment, pool_id)
    failures = annotators.failures()
    assert failures, "no post met the dead API: the kill came too late"
    # Connection errors only, and only while the API was down (give or take a thread switch).
    assert all(f.status is None and killed <= f.at <= back + 1 for f in failures), failures
    report(
        "API restart",
        down_seconds=round(back - killed, 1),
        labels_acknowledged=len(annotators.acknowledged),
        connection_errors=len(failures),
    )


def test_dropped_database_connections_cost_a_retry_and_nothing_else(
    deployment: Deployment,
    workers: Callable[[str], subprocess.Popen],
    annotator: Annotator,
    postgres_url: str,
) -> None:
    training = round_in_training(deployment, workers, annotator, "postgres")
    pool_id, round_id = training.pool_id, training.round_id
    database = deployment.database.url.database
    # The server's own connection, on another database: it survives what it terminates.
    server = make_engine(postgres_url).execution_options(isolation_level="AUTOCOMMIT")
    with Annotators(deployment, training.labeled) as annotators, server.connect() as watcher:
        annotators.flowing_since(time.monotonic())
        with deployment.database.connect() as holder:
            # Posting a label and the worker's heartbeat wait on these locks, so that the
            # drop catches both in flight rather than between two statements.
            holder.execute(text("LOCK TABLE labels, rounds IN EXCLUSIVE MODE"))

            def waiting(pattern: str) -> int:
                return watcher.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = :database"
                        " AND wait_event_type = 'Lock' AND query LIKE :pattern"
                    ),
                    {"database": database, "pattern": pattern},
                ).scalar_one()

            wait_for(
                # eta_seconds: the heartbeat's UPDATE, not the sweeper's
                lambda: (
                    waiting("INSERT INTO labels%") and waiting("UPDATE rounds SET%eta_seconds%")
                ),
                30,
                "a label post and a heartbeat to wait on the locks",
                every=0.05,
            )
            dropped_at = time.monotonic()
            dropped = watcher.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = :database"
                ),
                {"database": database},
            ).scalar_one()
            holder.invalidate()  # terminated with the rest: nothing to roll back
        # The very next request is served: the pool replaces dead connections (pre-ping).
        assert deployment.api.get(f"/rounds/{round_id}").status_code == 200
        recovered = time.monotonic() - dropped_at
        annotators.flowing_since(time.monotonic())
    server.dispose()

    # The heartbeat that was cut off is logged and the next one renews the lease: no retry.
    assert_finished_once(deployment, round_id)
    worker_log = (deployment.logs / "worker-postgres.log").read_text(errors="replace")
    # Cut off in the training loop's beat or, rarely, in the keep-alive thread's.
    cut_off = ("heartbeat failed", "renewing the lease failed")
    assert any(f"round {round_id}: {message}" in worker_log for message in cut_off)
    assert annotators.labels() <= stored_labels(deployment, pool_id)
    # A post whose INSERT was cut off is answered 503, not written again by the API (it may
    # have committed): its retry finds its labels current, so no label is stored twice.
    with deployment.database.connect() as connection:
        rows = connection.execute(
            text("SELECT item_id, value_class, annotator FROM labels WHERE pool_id = :pool"),
            {"pool": pool_id},
        ).all()
    assert len(rows) == len(set(rows))
    failures = annotators.failures()
    assert failures, "no post was in flight when the connections were dropped"
    assert all(
        (f.status, f.error, f.retry_after) == (503, "DatabaseUnavailable", "1") for f in failures
    ), failures
    assert all(f.at >= dropped_at for f in failures)
    report(
        "PostgreSQL connections dropped",
        connections_terminated=dropped,
        next_request_served_after=round(recovered, 2),
        labels_acknowledged=len(annotators.acknowledged),
        answered_503=len(failures),
    )


def test_a_redis_restart_loses_no_round_and_no_label(
    deployment: Deployment,
    workers: Callable[[str], subprocess.Popen],
    annotator: Annotator,
    redis_server: RedisServer,
) -> None:
    late_pool = create_pool(deployment, "redis-late", {"network": "mlp"})
    training = round_in_training(deployment, workers, annotator, "redis", LONGER_TRAINING)
    pool_id, round_id = training.pool_id, training.round_id
    with Annotators(deployment, training.labeled) as annotators:
        annotators.flowing_since(time.monotonic())
        assert deployment.row(round_id).status == RoundStatus.running
        redis_server.kill()  # SIGKILL: its queue and the running task's message are gone
        down = time.monotonic()
        readiness = deployment.api.get("/readyz")
        assert readiness.status_code == 503
        assert readiness.json()["checks"]["broker"].startswith("unreachable")
        # A round asked for now is stored and queued: the workers' sweeper sends it later.
        during = start_round(deployment, late_pool, budget=10)
        assert during["status"] == "queued"
        annotators.flowing_since(down)  # labels need no broker
        time.sleep(max(0.0, down + OUTAGE_SECONDS - time.monotonic()))
        outlived = deployment.row(round_id).status == RoundStatus.running
        redis_server.start()
        up, up_at = time.monotonic(), utcnow()
        annotators.flowing_since(up)

    assert_finished_once(deployment, round_id)
    assert_finished_once(deployment, during["id"], budget=10)
    assert annotators.labels() <= stored_labels(deployment, pool_id)
    assert annotators.failures() == []
    # New rounds go straight to the broker again, not through the sweeper.
    after = start_round(deployment, late_pool, budget=10)
    assert_finished_once(deployment, after["id"], budget=10)
    worker_log = (deployment.logs / "worker-redis.log").read_text(errors="replace")
    assert "Connection to broker lost" in worker_log  # the worker did see the outage
    api_log = (deployment.logs / "api.log").read_text(errors="replace")
    assert f"round {during['id']} is queued but the broker is unreachable" in api_log
    assert f"round {after['id']} is queued" not in api_log
    report(
        "Redis restart",
        down_seconds=round(up - down, 1),
        running_round_ready_after=seconds_since(up_at, deployment.row(round_id).finished_at),
        queued_round_started_after=seconds_since(up_at, deployment.row(during["id"]).started_at),
        round_ran_through_the_outage=outlived,
        labels_acknowledged=len(annotators.acknowledged),
    )
