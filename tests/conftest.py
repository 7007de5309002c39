import os
import shutil
import socket

import pytest

POSTGRES_URL = os.environ.get(
    "ALLY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("ALLY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

START_COMMANDS = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "Redis": (
        'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
        "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
    ),
}


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def unavailable(message: str) -> None:
    """Fail under CI, skip elsewhere: something the tests need is missing."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_service(name: str, port: int) -> None:
    """A real service the integration tests need must be up."""
    if not _reachable(port):
        unavailable(
            f"{name} is not reachable on 127.0.0.1:{port}; start it with: {START_COMMANDS[name]}"
        )


def require_command(name: str, install: str) -> None:
    """A program the integration tests run must be installed."""
    if shutil.which(name) is None:
        unavailable(f"{name} is not installed; install it with: {install}")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    require_service("PostgreSQL", 5432)
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_service("Redis", 6379)
    return REDIS_URL
