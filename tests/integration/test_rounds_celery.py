"""Rounds through the whole deployment: the API over HTTP, Redis, PostgreSQL, Celery workers.

Everything is real and runs in subprocesses: `ally serve` and `ally worker`, on a database
and a Redis database number of this module's own, with short leases so that a killed
worker's round is recovered in seconds. The annotator keeps the ground truth to itself and
answers through the API, as in the demo.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import Engine, func, make_url, text
from sqlmodel import Session, select

from service.datasets import packaged
from service.db import make_engine
from service.models import Label, Query, Round
from tests.processes import children
from worker.demo import Annotator

pytestmark = pytest.mark.integration

LEASE_SECONDS = 4
DIGITS = [str(d) for d in range(10)]
# Long enough to be caught training (a few seconds), short enough to run twice: a learning
# rate too small to ever reach the accuracy that stops training early.
LONG_TRAINING = {"network": "mlp", "training": {"max_epochs": 2000, "primal_lr": 1e-9}}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(probe: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """`probe()`'s first truthy value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def _claim_redis_db(server: str) -> int:
    """A Redis database number no other test run is using, marked as ours."""
    for number in range(1, 15):
        client = redis.Redis.from_url(f"{server}/{number}")
        try:
            if client.dbsize() == 0 and client.set("ally:it:owner", os.getpid(), nx=True):
                return number
        finally:
            client.close()
    raise RuntimeError("no empty Redis database left for the integration tests")


@dataclass
class Deployment:
    """The running API, the means to start workers, and a direct view of the database."""

    env: dict[str, str]
    logs: Path
    api: httpx.Client
    annotator: httpx.Client
    database: Engine
    processes: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        """`ally ARGS` in a process group of its own, so that a test can kill all of it."""
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process

    def start_worker(self, name: str) -> subprocess.Popen:
        return self.spawn(name, "worker", "--concurrency", "1", "--loglevel", "info")

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def round(self, round_id: int) -> dict:
        response = self.api.get(f"/rounds/{round_id}")
        response.raise_for_status()
        return response.json()

    def wait_round(self, round_id: int, status: str, timeout: float) -> dict:
        def reached() -> dict | None:
            round_ = self.round(round_id)
            if round_["status"] in ("failed", "cancelled") and status != round_["status"]:
                raise AssertionError(f"round ended {round_['status']}: {round_['error']}")
            return round_ if round_["status"] == status else None

        try:
            return wait_for(reached, timeout, f"round {round_id} to be {status}")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.log_tails()}") from None

    def row(self, round_id: int) -> Round:
        with Session(self.database) as session:
            round_ = session.get(Round, round_id)
            assert round_ is not None
            return round_


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def deployment(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("deployment")
    # Our own database and Redis number: other test runs on this machine keep theirs.
    name = f"ally_it_{os.getpid()}"
    admin = make_engine(postgres_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    database_url = make_url(postgres_url).set(database=name).render_as_string(False)
    redis_server = redis_url.rsplit("/", 1)[0]
    redis_db = _claim_redis_db(redis_server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLY_")}
    env |= {
        "ALLY_DATABASE_URL": database_url,
        "ALLY_BROKER_URL": f"{redis_server}/{redis_db}",
        "ALLY_DATA_DIR": str(tmp / "data"),
        "ALLY_ROUND_LEASE_SECONDS": str(LEASE_SECONDS),
        # The API, the worker and pytest share two cores: torch's thread pool would spin.
        "OMP_NUM_THREADS": "1",
    }
    logs = tmp / "logs"
    logs.mkdir()
    keys = {}
    for role in ("admin", "annotator"):
        created = subprocess.run(
            [sys.executable, "-m", "worker.cli", "keys", "create", "--role", role, "--name", role],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        keys[role] = created.stdout.strip()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    deployment = Deployment(
        env=env,
        logs=logs,
        api=httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys['admin']}"}),
        annotator=httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {keys['annotator']}"}
        ),
        database=make_engine(database_url),
    )
    try:
        api = deployment.spawn("api", "serve", "--host", "127.0.0.1", "--port", str(port))

        def ready() -> bool:
            assert api.poll() is None, deployment.log_tails()
            try:
                return deployment.api.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 60, "the API")
        yield deployment
    finally:
        for process in deployment.processes:
            _stop(process)
        deployment.api.close()
        deployment.annotator.close()
        deployment.database.dispose()
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        redis.Redis.from_url(f"{redis_server}/{redis_db}").flushdb()


@pytest.fixture
def workers(deployment: Deployment) -> Iterator[Callable[[str], subprocess.Popen]]:
    """Start Celery workers; whatever is left of them is killed after the test."""
    started: list[subprocess.Popen] = []

    def start(name: str) -> subprocess.Popen:
        process = deployment.start_worker(name)
        started.append(process)
        return process

    yield start
    for process in started:
        _stop(process)


@pytest.fixture(scope="module")
def annotator() -> Annotator:
    """The simulated human: knows every digit by its pixels."""
    return Annotator(list(packaged("digits").values()))


def create_pool(deployment: Deployment, name: str, model_spec: dict) -> int:
    """A pool of the 1,797 digits, a fifth of them held out with their labels."""
    created = deployment.api.post(
        "/pools",
        json={
            "name": name,
            "task": "classification",
            "classes": DIGITS,
            "input_kind": "image",
            "model_spec": model_spec,
        },
    )
    assert created.status_code == 201, created.text
    pool_id = created.json()["id"]
    imported = deployment.api.post(
        f"/pools/{pool_id}/import", json={"dataset": "digits", "holdout_fraction": 0.2}
    )
    assert imported.status_code == 201, imported.text
    assert imported.json()["added"] == {"pool": 1438, "holdout": 359}
    return pool_id


def start_round(deployment: Deployment, pool_id: int, budget: int) -> dict:
    response = deployment.api.post(
        "/rounds", json={"pool_id": pool_id, "strategy": "ally", "budget": budget}
    )
    assert response.status_code == 202, response.text
    return response.json()


def answer_queries(
    deployment: Deployment, annotator: Annotator, round_id: int, name: str
) -> list[tuple[int, str, str]]:
    """Label the round's queries as `name`, looking at each image; the acknowledged labels."""
    page = deployment.annotator.get(f"/queries/{round_id}", params={"limit": 500})
    assert page.status_code == 200, page.text
    answers = []
    for query in page.json()["data"]:
        image = deployment.annotator.get(f"/items/{query['item_id']}/image")
        image.raise_for_status()
        answers.append(
            {
                "item_id": query["item_id"],
                "value": annotator.answer(image.content),
                "annotator": name,
            }
        )
    posted = deployment.annotator.post("/labels", json=answers)
    assert posted.status_code == 200, posted.text
    return [(a["item_id"], a["value"], a["annotator"]) for a in answers]


def query_items(deployment: Deployment, round_id: int) -> list[int]:
    page = deployment.api.get(f"/queries/{round_id}", params={"limit": 500})
    assert page.status_code == 200, page.text
    return [q["item_id"] for q in page.json()["data"]]


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
    pool_id = create_pool(deployment, "killed", LONG_TRAINING)
    first_worker = workers("worker-first")
    cold = start_round(deployment, pool_id, budget=40)
    deployment.wait_round(cold["id"], "ready", timeout=90)
    acknowledged = answer_queries(deployment, annotator, cold["id"], "alice")

    budget = 25
    round_id = start_round(deployment, pool_id, budget=budget)["id"]
    wait_for(
        lambda: deployment.round(round_id)["phase"] == "train",
        90,
        "the round to train",
        every=0.1,
    )
    first_claim = deployment.row(round_id).claimed_by
    os.killpg(first_worker.pid, signal.SIGKILL)  # the worker and its pool process, at once
    first_worker.wait(timeout=30)
    interrupted = deployment.round(round_id)
    assert interrupted["status"] == "running" and interrupted["attempts"] == 1

    # Annotators keep working while no worker runs: a second opinion on round 1's items.
    acknowledged += answer_queries(deployment, annotator, cold["id"], "bob")
    workers("worker-second")
    done = deployment.wait_round(round_id, "ready", timeout=120)

    assert done["attempts"] == 2 and done["error"] is None
    assert deployment.row(round_id).claimed_by not in (None, first_claim)
    items = query_items(deployment, round_id)
    assert len(items) == len(set(items)) == budget
    with Session(deployment.database) as session:
        stored = session.exec(
            select(func.count()).select_from(Query).where(Query.round_id == round_id)
        ).one()
        labels = {
            (label.item_id, label.value_class, label.annotator)
            for label in session.exec(select(Label).where(Label.pool_id == pool_id))
        }
    assert stored == budget  # one query set, although two workers ran the round
    assert set(acknowledged) <= labels and len(acknowledged) == 80


def test_a_pool_process_killed_mid_round_is_replaced_and_the_round_completes_once(
    deployment: Deployment,
    workers: Callable[[str], subprocess.Popen],
    annotator: Annotator,
) -> None:
    """The kernel's OOM killer takes the process running the round, not the worker."""
    pool_id = create_pool(deployment, "oom", LONG_TRAINING)
    worker = workers("worker-oom")
    cold = start_round(deployment, pool_id, budget=40)
    deployment.wait_round(cold["id"], "ready", timeout=90)
    answer_queries(deployment, annotator, cold["id"], "alice")

    round_id = start_round(deployment, pool_id, budget=25)["id"]
    wait_for(
        lambda: deployment.round(round_id)["phase"] == "train",
        90,
        "the round to train",
        every=0.1,
    )
    [child] = children(worker.pid)
    os.kill(child, signal.SIGKILL)
    # The worker requeues the task (reject on worker lost) and forks a new pool process; the
    # round is claimed again once its lease has run out, through that redelivery (if the new
    # process gets to it late enough) or else through the sweeper's.
    done = deployment.wait_round(round_id, "ready", timeout=120)
    assert worker.poll() is None, "the worker itself lives on"
    assert done["attempts"] == 2 and done["error"] is None
    items = query_items(deployment, round_id)
    assert len(items) == len(set(items)) == 25
    assert child not in children(worker.pid) and len(children(worker.pid)) == 1
