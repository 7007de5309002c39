"""What PostgreSQL tells each API process (service/changes.py, migrations 0007 and 0010): the
rounds whose GET /queries pages changed, the keys revoked or changed. On a real database,
with real notifications."""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from sqlalchemy import Engine, text, update
from sqlmodel import Session

from service import auth, changes
from service.api.deps import get_blobs
from service.app import create_app
from service.auth import LiveKeys, create_key, hash_key, live_keys, revoke_key
from service.blobs import FileBlobStore
from service.changes import ChangeFeed
from service.db import get_engine, migrate
from service.models import Item, Query, Role
from service.page_cache import PageCache
from service.settings import settings
from tests.service.factories import (
    make_items,
    make_label,
    make_pool,
    make_round,
    serving,
    statements,
)

pytestmark = [
    pytest.mark.anyio,
    # Notifications are PostgreSQL's: on SQLite no page is kept.
    pytest.mark.parametrize("empty_engine", ["postgresql"], indirect=True),
]
PAGE = (0, 50, "http://test/")


@pytest.fixture
def engine(empty_engine: Engine) -> Engine:
    migrate(empty_engine)
    return empty_engine


def url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


async def eventually(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {seconds} s: {what}")


@asynccontextmanager
async def listening(
    engine: Engine,
    pages: PageCache,
    keys: LiveKeys | None = None,
    idle_check: float | None = 0.2,  # None: the feed's own, from the keys' ttl
) -> AsyncIterator[None]:
    feed = ChangeFeed(url(engine), pages, keys or LiveKeys(ttl=1), idle_check=idle_check)
    running = asyncio.create_task(feed.run())
    try:
        await eventually(lambda: pages.version() is not None, "listening")
        yield
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running


def three_rounds(engine: Engine, blobs: FileBlobStore) -> tuple[list[int], list[int]]:
    """Three ready rounds of one item each, and a fourth item no round queried."""
    with Session(engine) as session:
        pool = make_pool(session)
        items = make_items(session, blobs, pool, 4)
        rounds = [make_round(session, pool, queried=[item]).id for item in items[:3]]
        session.commit()
        return rounds, [item.id for item in items]  # type: ignore[return-value, misc]


def cut_off_the_feed(engine: Engine) -> None:
    """Terminate the change feed's connection, as a restarted server or a network fault would."""
    with engine.connect() as connection:
        cut = connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = :name"
            ),
            {"name": changes.APPLICATION_NAME},
        ).all()
    assert len(cut) == 1


def keep(pages: PageCache, round_ids: list[int]) -> None:
    for round_id in round_ids:
        pages.put(round_id, PAGE, (1, b"page"), pages.version())


def label_item(engine: Engine, item_id: int, value: str) -> None:
    """A label committed by another process than the one that keeps the pages."""
    with Session(engine) as session:
        make_label(session, session.get_one(Item, item_id), value, annotator="alice")
        session.commit()


def kept(pages: PageCache, round_ids: list[int]) -> list[int]:
    return [r for r in round_ids if pages.get(r, PAGE) is not None]


async def test_a_label_or_a_lease_drops_the_pages_of_the_rounds_it_changed(
    engine: Engine, blobs: FileBlobStore
) -> None:
    rounds, items = three_rounds(engine, blobs)
    pages = PageCache()
    async with listening(engine, pages):
        keep(pages, rounds)
        label_item(engine, items[0], "1")
        await eventually(lambda: kept(pages, rounds) == rounds[1:], "round 1 dropped")

        with Session(engine) as session:
            session.execute(
                update(Query).where(Query.round_id == rounds[1]).values(leased_to="bob")
            )
            session.commit()
        await eventually(lambda: kept(pages, rounds) == rounds[2:], "round 2 dropped")

        # A label of an item no round queried, then one of round 3's: only the second tells.
        label_item(engine, items[3], "1")
        with Session(engine) as session:
            make_label(session, session.get_one(Item, items[2]), "1", annotator="alice")
            session.rollback()  # never committed: never told
        await asyncio.sleep(0.5)
        assert kept(pages, rounds) == rounds[2:]

        # A notification that is not ours to read drops every page, and listening goes on.
        with engine.connect() as connection:
            connection.execute(text("NOTIFY ally_rounds, 'not ours'"))
            connection.commit()
        await eventually(lambda: kept(pages, rounds) == [], "every page dropped")
        keep(pages, rounds)
        label_item(engine, items[0], "2")
        await eventually(lambda: kept(pages, rounds) == rounds[1:], "round 1 dropped again")


async def test_a_lost_connection_drops_every_page_and_keeps_none_until_listening_again(
    engine: Engine, blobs: FileBlobStore
) -> None:
    rounds, _ = three_rounds(engine, blobs)
    pages = PageCache()
    async with listening(engine, pages):
        keep(pages, rounds)
        cut_off_the_feed(engine)
        await eventually(lambda: pages.version() is None, "listening stopped")
        assert kept(pages, rounds) == []
        await eventually(lambda: pages.version() is not None, "listening again")
        keep(pages, rounds)
        assert kept(pages, rounds) == rounds


async def test_get_queries_serves_a_kept_page_until_a_label_changes_it(
    engine: Engine, blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "database_url", url(engine))
    monkeypatch.setattr(live_keys, "ttl", 600)  # the key is looked up once, by the first GET
    rounds, items = three_rounds(engine, blobs)
    with Session(engine) as session:
        _, key = create_key(session, name="alice", role=Role.annotator)
        session.commit()
    app = create_app()
    app.dependency_overrides[get_blobs] = lambda: blobs
    async with serving(app, key) as client:
        await eventually(lambda: app.state.pages.version() is not None, "listening")
        first = await client.get(f"/queries/{rounds[0]}")
        with statements(get_engine()) as seen:
            again = await client.get(f"/queries/{rounds[0]}")
        assert again.status_code == 200 and again.content == first.content
        assert seen == []  # the kept page: no statement at all
        assert [q["labeled"] for q in again.json()["data"]] == [False]

        posted = await client.post("/labels", json={"item_id": items[0], "value": "3"})
        assert posted.status_code == 200, posted.text
        # This process's own label shows at once, not after the notification.
        page = await client.get(f"/queries/{rounds[0]}")
        assert [q["labeled"] for q in page.json()["data"]] == [True]


async def test_a_key_revoked_elsewhere_is_forgotten_at_once(engine: Engine) -> None:
    keys = LiveKeys(ttl=600)  # remembered for ten minutes: only the notification forgets it
    with Session(engine) as session:
        row, key = create_key(session, name="mallory", role=Role.annotator)
        session.commit()
        key_id = row.id
        assert keys.find(session, key) is not None
    async with listening(engine, PageCache(), keys):
        assert keys.remembered(key) is not None
        with Session(engine) as session:  # as another process revokes it
            revoke_key(session, key_id)  # type: ignore[arg-type]
            session.commit()
        await eventually(lambda: keys.remembered(key) is None, "the revoked key forgotten")


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key hashes looked up in the database."""
    seen: list[str] = []
    find_hashed = auth._find_hashed

    def counted(session: Session, key_hash: str) -> auth.Caller | None:
        seen.append(key_hash)
        return find_hashed(session, key_hash)

    monkeypatch.setattr(auth, "_find_hashed", counted)
    return seen


def annotator_key(engine: Engine) -> tuple[int, str]:
    with Session(engine) as session:
        row, key = create_key(session, name="alice", role=Role.annotator)
        session.commit()
        return row.id, key  # type: ignore[return-value]


async def test_a_key_is_looked_up_once_while_the_feed_answers_and_again_once_it_is_cut_off(
    engine: Engine, lookups: list[str]
) -> None:
    """Past its own `ttl`, a key is trusted as long as the feed answers its checks; a feed cut
    off vouches for nothing (a revocation it missed is refused within `ttl`)."""
    keys = LiveKeys(ttl=1)  # the feed checks every 0.25 s
    pages = PageCache()
    _, key = annotator_key(engine)
    async with listening(engine, pages, keys, idle_check=None):
        with Session(engine) as session:
            assert keys.find(session, key) is not None
            await asyncio.sleep(2.5 * keys.ttl)
            assert keys.find(session, key) is not None
            assert len(lookups) == 1

            cut_off_the_feed(engine)
            await eventually(lambda: pages.version() is None, "listening stopped")
            assert keys.remembered(key) is None
            assert keys.find(session, key) is not None
            assert len(lookups) == 2


async def test_a_change_told_with_a_check_s_answer_is_passed_on_before_the_feed_vouches(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notification that arrives while the check runs is kept by psycopg for the next
    notifies(): it must be passed on before the check vouches for the keys."""
    keys = LiveKeys(ttl=600)
    _, key = annotator_key(engine)
    with Session(engine) as session:
        keys.find(session, key)
    # The check itself tells of a change to the key (a notification to its own connection).
    monkeypatch.setattr(changes, "CHECK", f"SELECT pg_notify('ally_keys', '{hash_key(key)}')")
    forgotten_when_heard: list[bool] = []
    heard = keys.heard

    def checking_heard(at: float) -> None:
        forgotten_when_heard.append(keys.remembered(key) is None)
        heard(at)

    monkeypatch.setattr(keys, "heard", checking_heard)
    async with listening(engine, PageCache(), keys):
        await eventually(lambda: bool(forgotten_when_heard), "a check answered")
    assert forgotten_when_heard[0]


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE api_keys SET role = 'admin' WHERE id = :key_id",
        "DELETE FROM api_keys WHERE id = :key_id",
        "INSERT INTO api_key_pools (key_id, pool_id) VALUES (:key_id, :pool_id)",
    ],
    ids=["role", "deleted", "pools"],
)
async def test_a_key_changed_by_hand_is_forgotten_at_once(engine: Engine, change: str) -> None:
    """Not only revocations: a key trusted until it changes must hear of every change."""
    keys = LiveKeys(ttl=600)
    key_id, key = annotator_key(engine)
    with Session(engine) as session:
        pool_id = make_pool(session).id
        session.commit()
        keys.find(session, key)
    async with listening(engine, PageCache(), keys):
        with engine.begin() as connection:  # as an operator would, in psql
            connection.execute(text(change), {"key_id": key_id, "pool_id": pool_id})
        await eventually(lambda: keys.remembered(key) is None, "the changed key forgotten")
