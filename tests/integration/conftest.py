"""Fixtures shared by the modules that run a `Deployment`; each module has its own `deployment`."""

import subprocess
from collections.abc import Callable, Iterator

import pytest

from service.datasets import packaged
from tests.integration.deployment import Deployment, stop
from worker.demo import Annotator


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
        stop(process)


@pytest.fixture(scope="session")
def annotator() -> Annotator:
    """The simulated human: knows every digit by its pixels."""
    return Annotator(list(packaged("digits").values()))
