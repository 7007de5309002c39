"""The service's tests run on a real, migrated database, SQLite and PostgreSQL, with each
test inside a transaction that is rolled back at the end (the handlers' commits only
release savepoints)."""

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio import to_thread
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, make_url, text
from sqlmodel import Session

from service.api.deps import (
    Database,
    LabelWriter,
    get_blobs,
    get_database,
    get_db,
    get_label_writer,
)
from service.app import create_app
from service.auth import create_key
from service.blobs import FileBlobStore
from service.db import make_engine, migrate
from service.label_writer import store_labels
from service.labels import LabelRequest
from service.models import Role
from service.settings import settings
from tests.databases import own_database

PG_DATABASE = "ally_test_service"


def _sqlite_engine(url: str) -> Engine:
    engine = make_engine(url)

    # pysqlite begins transactions lazily and breaks SAVEPOINT; take over (SQLAlchemy's recipe).
    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


def _postgres_engine(server_url: str) -> Engine:
    """An engine on our own database, created if absent, so other suites never see our rows."""
    return make_engine(own_database(server_url, PG_DATABASE))


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = _sqlite_engine(f"sqlite:///{tmp_path_factory.mktemp('db') / 'service.db'}")
    else:
        engine = _postgres_engine(request.getfixturevalue("postgres_url"))
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A database of the test's own with no tables, dropped afterwards: for migration tests,
    which must not move the shared test database's schema."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        yield engine
        engine.dispose()
        return
    server_url = request.getfixturevalue("postgres_url")
    database = f"ally_test_empty_{os.getpid()}"
    admin = make_engine(server_url)

    def run(statement: str) -> None:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(statement))

    # A crashed run with the same pid may have left it behind, with tables in it.
    run(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    run(f'CREATE DATABASE "{database}"')
    engine = make_engine(make_url(server_url).set(database=database).render_as_string(False))
    yield engine
    engine.dispose()
    run(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(autouse=True)
def no_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded mode unless a test says otherwise: nothing is sent anywhere."""
    monkeypatch.setattr(settings, "broker_url", None)


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with engine.connect() as connection:
        transaction = connection.begin()
        session = Session(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        yield session
        session.close()
        transaction.rollback()


@pytest.fixture
def blobs(tmp_path: Any) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


@pytest.fixture
def app(session: Session, blobs: FileBlobStore) -> FastAPI:
    app = create_app(startup=False)

    def test_db() -> Iterator[Session]:
        # Like get_db, on the test's session: what the test set up counts as committed, the
        # request's commit releases a savepoint, and its errors roll back to that savepoint.
        session.commit()
        try:
            yield session
            session.commit()
        except Exception:
            session.rollback()
            raise

    def in_transaction(work: Callable[..., Any], *args: Any) -> Any:
        # A transaction of its own (the label writer's, Database.run's), on the test's session.
        session.commit()
        try:
            result = work(session, *args)
            session.commit()
        except Exception:
            session.rollback()
            raise
        return result

    class TestDatabase(Database):
        async def run(self, work: Callable[..., Any], *args: Any, wait_turn: bool = True) -> Any:
            return await to_thread.run_sync(in_transaction, work, *args)

    async def write(requests: list[LabelRequest]) -> list[Any]:
        return await to_thread.run_sync(
            in_transaction, lambda s, r: store_labels(s.connection(), r).answers, requests
        )

    app.dependency_overrides[get_db] = test_db
    app.dependency_overrides[get_database] = TestDatabase
    app.dependency_overrides[get_label_writer] = lambda: LabelWriter(write)
    app.dependency_overrides[get_blobs] = lambda: blobs
    return app


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    return TestClient(app)


def _bearer(session: Session, role: Role, name: str) -> dict[str, str]:
    _, key = create_key(session, name=name, role=role)
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def admin(session: Session) -> dict[str, str]:
    """Headers carrying an admin key."""
    return _bearer(session, Role.admin, "root")


@pytest.fixture
def annotator(session: Session) -> dict[str, str]:
    """Headers carrying an annotator key named alice."""
    return _bearer(session, Role.annotator, "alice")
