"""The embedded runner: rounds in spawned local processes, with no broker."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine

from service.models import RoundStatus
from service.settings import settings
from tests.processes import alive, children
from tests.worker.conftest import sqlite_only
from tests.worker.factories import add_round, get_round, import_pool, label, queries
from worker.embedded import EmbeddedRunner


@pytest.fixture
def child_env(database: Engine, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Spawned processes read their settings from the environment: the same database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLY_")}
    env["ALLY_DATA_DIR"] = str(settings.data_dir)
    if settings.database_url:
        env["ALLY_DATABASE_URL"] = settings.database_url
    for name in [k for k in os.environ if k.startswith("ALLY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("ALLY_"):
            monkeypatch.setenv(name, value)
    return env


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def test_the_embedded_runner_runs_a_queued_round(child_env: dict[str, str]) -> None:
    pool, _ = import_pool("digits", 200)
    round_id = add_round(pool, budget=12)
    with EmbeddedRunner(poll_seconds=0.2):
        wait_for(lambda: get_round(round_id).status == RoundStatus.ready, 90, "a ready round")
    assert len(queries(round_id)) == 12 and get_round(round_id).attempts == 1


class Servers:
    """`ally serve` processes started by a test, and their children, all ended afterwards."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.started: list[subprocess.Popen] = []
        self.children: list[int] = []

    def start(self) -> subprocess.Popen:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--port", str(port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.started.append(process)
        return process

    def children_of(self, process: subprocess.Popen) -> list[int]:
        found = children(process.pid)
        self.children += found
        return found

    def stop(self) -> None:
        for process in self.started:
            self.children_of(process)
            process.kill()
            process.wait(timeout=30)
        for pid in self.children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def servers(child_env: dict[str, str]) -> Iterator[Servers]:
    servers = Servers(child_env)
    yield servers
    servers.stop()


@sqlite_only
def test_stopping_ally_serve_mid_round_leaves_no_round_process_behind(
    servers: Servers,
) -> None:
    servers.env["ALLY_ROUND_LEASE_SECONDS"] = "6"  # progress written every second
    training = {"max_epochs": 1_000_000, "target_accuracy": 2.0}
    pool, truth = import_pool("digits", 200, model_spec={"network": "mlp", "training": training})
    label(pool, truth, sorted(truth)[:30])
    round_id = add_round(pool, budget=5, labeled=30)
    process = servers.start()
    wait_for(lambda: get_round(round_id).phase == "train", 90, "the round to train")
    round_processes = servers.children_of(process)
    assert round_processes
    process.send_signal(signal.SIGTERM)  # how the demo, systemd or docker stop the server
    process.wait(timeout=30)
    wait_for(lambda: not any(alive(pid) for pid in round_processes), 10, "the round process to end")
    assert get_round(round_id).status == RoundStatus.running  # its lease will run out
