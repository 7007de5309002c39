"""The worker's tests run the pipeline as a worker does, on a real migrated database.

The pipeline commits in sessions of its own, so a test cannot wrap it in a transaction to
roll back; instead every test starts on empty tables: a fresh SQLite file in a temporary
ALLY_DATA_DIR, or the worker tests' own PostgreSQL database truncated before the test runs.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlmodel import SQLModel

from service.db import get_engine, make_engine, migrate
from service.settings import settings
from tests.databases import own_database

PG_DATABASE = "ally_test_worker"


@pytest.fixture(scope="session")
def worker_postgres_url(postgres_url: str) -> str:
    """A migrated database of our own, so other suites never see the worker tests' rows."""
    url = own_database(postgres_url, PG_DATABASE)
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Engine]:
    """Point the worker's settings at an empty database and a temporary data directory."""
    monkeypatch.setattr(settings, "data_dir", tmp_path / "data")
    monkeypatch.setattr(settings, "broker_url", None)
    if request.param == "sqlite":
        monkeypatch.setattr(settings, "database_url", None)
        engine = get_engine()
        migrate(engine)
        yield engine
        engine.dispose()
        return
    monkeypatch.setattr(settings, "database_url", request.getfixturevalue("worker_postgres_url"))
    engine = get_engine()  # cached per URL: shared by the tests, as a worker process shares it
    tables = ", ".join(f'"{name}"' for name in SQLModel.metadata.tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield engine


# Most pipeline tests are about what a round computes, not about the database under it.
sqlite_only = pytest.mark.parametrize("database", ["sqlite"], indirect=True)
