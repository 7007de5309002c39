"""GET /queries pages of ready rounds, kept rendered until PostgreSQL says they changed.

A ready round's queries never change, but what its page says of them does: an item gets a
label, an annotator takes a lease. Triggers (migration 0007) tell each API process, through
LISTEN/NOTIFY, which rounds a committed transaction touched, and the process drops their
pages; its own writes drop them at once. A process that is not listening (SQLite, or its
connection is down) keeps no page.
"""

import asyncio
import logging
from collections.abc import Iterable

from sqlalchemy import make_url

log = logging.getLogger(__name__)

CHANNEL = "ally_rounds"
EVERY_ROUND = "*"  # the payload when the rounds' ids would not fit in one notification


class PageCache:
    """Rendered pages by round and by request (offset, limit, base URL).

    A page rendered from a read that began before a change to its round was told here is
    never stored: `version()` is taken before the read and `put` compares. For the event
    loop's thread only (the routes and the listener run there).
    """

    def __init__(self, most: int = 1000) -> None:
        self.most = most  # pages kept, over all rounds
        self._pages: dict[int, dict[tuple[int, int, str], tuple[int, bytes]]] = {}
        self._count = 0
        self._listening = False
        self._clock = 0  # counts changes told
        self._changed_at: dict[int, int] = {}  # round -> the clock at its last change
        self._all_changed_at = 0

    def get(self, round_id: int, request: tuple[int, int, str]) -> tuple[int, bytes] | None:
        """The round's pool id and the page's JSON, if kept."""
        if not self._listening:
            return None
        return self._pages.get(round_id, {}).get(request)

    def version(self) -> int | None:
        """To take before reading a page from the database; None: it will not be kept."""
        return self._clock if self._listening else None

    def put(
        self,
        round_id: int,
        request: tuple[int, int, str],
        page: tuple[int, bytes],
        version: int | None,
    ) -> None:
        """Keep `page` unless its round changed since `version` was taken."""
        if (
            version is None
            or not self._listening
            or self._all_changed_at > version
            or self._changed_at.get(round_id, 0) > version
        ):
            return
        if request not in self._pages.get(round_id, {}):
            if self._count >= self.most:  # rare: start afresh rather than track ages
                self._forget_all()
            self._count += 1
        self._pages.setdefault(round_id, {})[request] = page

    def changed(self, round_ids: Iterable[int] | None) -> None:
        """These rounds' pages changed in the database; None: any round's may have."""
        self._clock += 1
        if round_ids is None:
            self._forget_all()
            return
        for round_id in round_ids:
            self._changed_at[round_id] = self._clock
            self._count -= len(self._pages.pop(round_id, {}))

    def set_listening(self, listening: bool) -> None:
        """Whether changes are told: pages are kept only while they are."""
        self._clock += 1
        self._forget_all()  # whatever happened while nobody listened
        self._listening = listening

    def _forget_all(self) -> None:
        self._all_changed_at = self._clock
        self._changed_at.clear()
        self._pages.clear()
        self._count = 0


def parse(payload: str) -> list[int] | None:
    """The round ids a notification names; None: every round (also for a payload that is
    not ours to read: dropping every page is always safe)."""
    try:
        return None if payload == EVERY_ROUND else [int(r) for r in payload.split(",")]
    except ValueError:
        log.warning("unreadable notification on %s: %r; dropping every page", CHANNEL, payload)
        return None


class RoundFeed:
    """Listens for the rounds changed in a PostgreSQL database and tells `pages`, on the
    event loop: `run()` until cancelled, reconnecting after a lost connection. `pages`
    keeps nothing while it is not listening."""

    def __init__(self, database_url: str, pages: PageCache, idle_check: float = 1.0) -> None:
        # A libpq URL: psycopg's own, without SQLAlchemy's "+psycopg".
        url = make_url(database_url).set(drivername="postgresql")
        self.conninfo = url.render_as_string(hide_password=False)
        self.pages = pages
        self.idle_check = idle_check  # seconds between checks that the connection is alive

    async def run(self) -> None:
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=10
                ) as connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    self.pages.set_listening(True)
                    log.info("listening for changed rounds")
                    while True:
                        async for note in connection.notifies(timeout=self.idle_check):
                            self.pages.changed(parse(note.payload))
                        # A dead connection shows here, not in notifies(); a half-open one
                        # would leave the check waiting, hence the time limit.
                        await asyncio.wait_for(
                            connection.execute("SELECT 1"), timeout=5 * self.idle_check
                        )
            except Exception as error:  # whatever it was, pages must not outlive it
                log.warning("not listening for changed rounds (%r); pages are not kept", error)
            finally:
                self.pages.set_listening(False)
            await asyncio.sleep(self.idle_check)
