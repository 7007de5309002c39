"""The real PostgreSQL and Redis the integration tests rely on answer as expected."""

import pytest
import redis
from sqlalchemy import text
from sqlmodel import create_engine

pytestmark = pytest.mark.integration


def test_postgres_runs_a_transaction_and_rolls_it_back(postgres_url):
    engine = create_engine(postgres_url)
    with engine.connect() as conn, conn.begin() as tx:
        conn.execute(text("CREATE TEMP TABLE probe (n int)"))
        conn.execute(text("INSERT INTO probe VALUES (41), (1)"))
        assert conn.execute(text("SELECT sum(n) FROM probe")).scalar_one() == 42
        tx.rollback()
    engine.dispose()


def test_redis_round_trips_a_value(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.set("ally:probe", "ok", ex=10)
    assert client.get("ally:probe") == b"ok"
    client.delete("ally:probe")
