"""A PostgreSQL database of a suite's own, so other suites never see its rows."""

import contextlib

from sqlalchemy import make_url, text
from sqlalchemy.exc import ProgrammingError

from service.db import make_engine


def own_database(server_url: str, name: str) -> str:
    """The URL of database `name` on the server of `server_url`, created if absent."""
    admin = make_engine(server_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        exists = connection.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
        ).first()
        if not exists:
            with contextlib.suppress(ProgrammingError):  # another test process was first
                connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(False)
