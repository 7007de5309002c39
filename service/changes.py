"""What other processes changed in the database, told to each API process by PostgreSQL
(LISTEN/NOTIFY, from the triggers of migrations 0007 and 0010): the rounds whose GET
/queries pages changed, and the API keys revoked or changed."""

import asyncio
import logging
from typing import Any

import psycopg

from service.auth import LiveKeys
from service.db import connect_async
from service.page_cache import PageCache

log = logging.getLogger(__name__)

ROUNDS = "ally_rounds"  # payload: round ids, comma-separated, or EVERY_ROUND
EVERY_ROUND = "*"  # when the rounds' ids would not fit in one notification
KEYS = "ally_keys"  # payload: the hash of a key revoked or changed
APPLICATION_NAME = "ally change feed"
CHECK = "SELECT 1"
CHECK_TIMEOUT = 5.0  # seconds: a check unanswered by then means a half-open connection
RECONNECT_PAUSE = 1.0  # seconds between attempts to listen again


def parse_rounds(payload: str) -> list[int] | None:
    """The round ids a notification names; None: every round (also for a payload that is
    not ours to read: dropping every page is always safe)."""
    try:
        return None if payload == EVERY_ROUND else [int(r) for r in payload.split(",")]
    except ValueError:
        log.warning("unreadable notification on %s: %r; dropping every page", ROUNDS, payload)
        return None


class ChangeFeed:
    """Listens on the event loop and tells `pages` which rounds changed and `keys` which
    keys were revoked or changed: `run()` until cancelled, reconnecting after a lost
    connection.

    Every `idle_check` seconds it checks that its connection is alive, and so vouches for
    `keys`: every change committed before the check was sent has been told. While it is not
    listening, `pages` keeps nothing and `keys` trusts a key for `key_cache_seconds`.
    """

    def __init__(
        self,
        database_url: str,
        pages: PageCache,
        keys: LiveKeys,
        idle_check: float | None = None,
    ) -> None:
        self.database_url = database_url
        self.pages = pages
        self.keys = keys
        if idle_check is None:
            # Four checks within a key's time, so that a slow one rarely lets its trust
            # lapse; with no time to vouch for, once a second for the pages' sake.
            idle_check = min(1.0, keys.ttl / 4) if keys.ttl > 0 else 1.0
        self.idle_check = idle_check

    async def run(self) -> None:
        while True:
            try:
                async with await connect_async(self.database_url, APPLICATION_NAME) as connection:
                    await connection.execute(f"LISTEN {ROUNDS}")
                    await connection.execute(f"LISTEN {KEYS}")
                    self.pages.set_listening(True)
                    self.keys.set_listening(True)
                    log.info("listening for changed rounds and keys")
                    while True:
                        await self._pass_on(connection, self.idle_check)
                        # A dead connection shows here, not in notifies(); a half-open one
                        # would leave the check waiting, hence the time limit.
                        sent = self.keys.clock()
                        await asyncio.wait_for(connection.execute(CHECK), CHECK_TIMEOUT)
                        # What arrived before the answer, kept by psycopg for notifies().
                        await self._pass_on(connection, 0)
                        self.keys.heard(sent)
            except Exception as error:  # whatever it was, pages must not outlive it
                log.warning("not listening for changes (%r); pages are not kept", error)
            finally:
                self.pages.set_listening(False)
                self.keys.set_listening(False)
            await asyncio.sleep(RECONNECT_PAUSE)

    async def _pass_on(self, connection: psycopg.AsyncConnection[Any], seconds: float) -> None:
        """Pass on the notifications that arrive within `seconds` (0: those already here)."""
        async for note in connection.notifies(timeout=seconds):
            if note.channel == KEYS:
                self.keys.forget(note.payload)
            else:
                self.pages.changed(parse_rounds(note.payload))
