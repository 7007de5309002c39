"""A whole deployment in subprocesses, for the tests that drive it over HTTP and break it.

`ally serve` and `ally worker` run on a database of their own and a broker the caller
chooses, with short leases so that a lost worker's round is recovered in seconds. The
simulated annotator keeps the ground truth to itself and answers through the API, as in
the demo.
"""

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from sqlalchemy import Engine, func, make_url, text
from sqlmodel import Session, select

from service.db import make_engine
from service.models import Label, Query, Round
from tests.processes import wait_for
from worker.demo import Annotator

LEASE_SECONDS = 4
DIGITS = [str(d) for d in range(10)]
# Long enough to be caught training (a few seconds), short enough to run twice: a learning
# rate too small to ever reach the accuracy that stops training early.
LONG_TRAINING = {"network": "mlp", "training": {"max_epochs": 2000, "primal_lr": 1e-9}}
# The budget of the round that the fault tests catch training.
BUDGET = 25


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def claim_redis_db(server: str) -> int:
    """A Redis database number no other test run is using, marked as ours."""
    for number in range(1, 15):
        client = redis.Redis.from_url(f"{server}/{number}")
        try:
            if client.dbsize() == 0 and client.set("ally:it:owner", os.getpid(), nx=True):
                return number
        finally:
            client.close()
    raise RuntimeError("no empty Redis database left for the integration tests")


def stop(process: subprocess.Popen) -> None:
    """SIGKILL the process and its group (a worker's pool processes with it)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@dataclass
class Deployment:
    """The running API, the means to start workers, and a direct view of the database."""

    env: dict[str, str]
    logs: Path
    port: int
    api: httpx.Client
    annotator: httpx.Client
    database: Engine
    processes: list[subprocess.Popen] = field(default_factory=list)
    api_process: subprocess.Popen | None = None

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

    def start_api(self) -> None:
        """`ally serve` on this deployment's port, returning once it is ready."""
        api = self.spawn("api", "serve", "--host", "127.0.0.1", "--port", str(self.port))
        self.api_process = api

        def ready() -> bool:
            assert api.poll() is None, self.log_tails()
            try:
                return self.api.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 60, "the API", every=0.1)

    def kill_api(self) -> None:
        assert self.api_process is not None
        stop(self.api_process)

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


@contextmanager
def deploy(postgres_url: str, database: str, broker_url: str, tmp: Path) -> Iterator[Deployment]:
    """The API running on a new PostgreSQL database `database`, dropped afterwards."""
    admin = make_engine(postgres_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f'CREATE DATABASE "{database}"'))
    database_url = make_url(postgres_url).set(database=database).render_as_string(False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLY_")}
    env |= {
        "ALLY_DATABASE_URL": database_url,
        "ALLY_BROKER_URL": broker_url,
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
    port = free_port()

    def client(role: str) -> httpx.Client:
        # httpx's default 5 s is too short for importing the digits when other jobs hold
        # both cores; a request that hangs is still cut off by pytest's timeout.
        return httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {keys[role]}"},
            timeout=60,
        )

    deployment = Deployment(
        env=env,
        logs=logs,
        port=port,
        api=client("admin"),
        annotator=client("annotator"),
        database=make_engine(database_url),
    )
    try:
        deployment.start_api()
        yield deployment
    finally:
        for process in deployment.processes:
            stop(process)
        deployment.api.close()
        deployment.annotator.close()
        deployment.database.dispose()
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


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


@dataclass
class TrainingRound:
    """A pool whose cold round is labeled, and its second round caught training."""

    pool_id: int
    cold_round_id: int
    round_id: int
    worker: subprocess.Popen
    labeled: list[tuple[int, str, str]]  # the cold round's labels: item, class, annotator


def round_in_training(
    deployment: Deployment,
    workers: Callable[[str], subprocess.Popen],
    annotator: Annotator,
    name: str,
    model_spec: dict | None = None,
) -> TrainingRound:
    """Start a worker `worker-NAME` and a pool `name` (LONG_TRAINING unless `model_spec`);
    label its cold round of 40 as alice, and return once its second round (of BUDGET) trains."""
    pool_id = create_pool(deployment, name, model_spec or LONG_TRAINING)
    worker = workers(f"worker-{name}")
    cold = start_round(deployment, pool_id, budget=40)
    deployment.wait_round(cold["id"], "ready", timeout=120)
    labeled = answer_queries(deployment, annotator, cold["id"], "alice")
    round_id = start_round(deployment, pool_id, budget=BUDGET)["id"]
    wait_for(
        lambda: deployment.round(round_id)["phase"] == "train",
        120,
        "the round to train",
        every=0.1,
    )
    return TrainingRound(pool_id, cold["id"], round_id, worker, labeled)


def assert_finished_once(
    deployment: Deployment, round_id: int, budget: int = BUDGET, attempts: int = 1
) -> None:
    """The round is ready after `attempts` attempts, with one query set of `budget` distinct
    items, however many workers ran it."""
    done = deployment.wait_round(round_id, "ready", timeout=120)
    assert done["attempts"] == attempts and done["error"] is None, done
    items = query_items(deployment, round_id)
    assert len(items) == len(set(items)) == budget
    with Session(deployment.database) as session:
        stored = session.exec(
            select(func.count()).select_from(Query).where(Query.round_id == round_id)
        ).one()
    assert stored == budget


def stored_labels(deployment: Deployment, pool_id: int) -> set[tuple[int, str, str]]:
    """The pool's labels in the database: item, class, annotator."""
    with Session(deployment.database) as session:
        return {
            (label.item_id, label.value_class or "", label.annotator)
            for label in session.exec(select(Label).where(Label.pool_id == pool_id))
        }
