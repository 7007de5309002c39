"""Engines and migrations, for the API, the CLI and the workers."""

import functools
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, event, make_url, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import create_engine

from service.settings import settings

MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every process migrating this database.
_MIGRATION_LOCK = 724_311_905


def make_engine(url: str) -> Engine:
    """An engine for `url`; on SQLite: foreign keys on, and writers wait instead of failing."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=settings.db_pool_size)
    _make_folder(url)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", _sqlite_foreign_keys)
    return engine


def make_sqlite_async_engine(url: str) -> AsyncEngine:
    """An asyncio engine (aiosqlite) for the SQLite database of `url`, set up as make_engine's:
    for SQLite's label writer, on the event loop without a thread of the pool."""
    _make_folder(url)
    engine = create_async_engine(
        make_url(url).set(drivername="sqlite+aiosqlite"), connect_args={"timeout": 30}
    )
    event.listen(engine.sync_engine, "connect", _sqlite_foreign_keys)
    return engine


def is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


async def connect_async(url: str, name: str) -> psycopg.AsyncConnection[Any]:
    """A psycopg AsyncConnection to the PostgreSQL database of `url`, in autocommit mode,
    without SQLAlchemy: for LISTEN, and the label writer. pg_stat_activity shows it as
    `name` unless the URL sets an application_name."""
    # A libpq URL: psycopg's own, without SQLAlchemy's "+psycopg".
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return await psycopg.AsyncConnection.connect(
        conninfo, autocommit=True, connect_timeout=10, fallback_application_name=name
    )


def _make_folder(sqlite_url: str) -> None:
    path = sqlite_url.split(":///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@functools.cache
def _engine_for(url: str) -> Engine:
    return make_engine(url)


def get_engine() -> Engine:
    """The engine for the configured database, built on first use."""
    return _engine_for(settings.database)


def is_disconnect(error: DBAPIError) -> bool:
    """The connection was lost or refused, or the server could not run the statement for now.

    Retrying may succeed; any other database error (IntegrityError, DataError,
    ProgrammingError, ...) is a bug in the statement and must not be retried or hidden.
    """
    return isinstance(error, OperationalError) or error.connection_invalidated


def alembic_config() -> Config:
    """Alembic's configuration, found from this package rather than from the working directory."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def migrate(engine: Engine | None = None) -> None:
    """Bring the database up to the latest migration (safe when several processes start)."""
    engine = engine or get_engine()
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
