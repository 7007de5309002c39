"""What other processes changed in the database, told to each API process by PostgreSQL
(LISTEN/NOTIFY, from the triggers of migrations 0007 and 0008): the rounds whose GET
/queries pages changed, and the API keys revoked."""

import asyncio
import logging

from service.auth import LiveKeys
from service.db import connect_async
from service.page_cache import PageCache

log = logging.getLogger(__name__)

ROUNDS = "ally_rounds"  # payload: round ids, comma-separated, or EVERY_ROUND
EVERY_ROUND = "*"  # when the rounds' ids would not fit in one notification
KEYS = "ally_keys"  # payload: the revoked key's hash


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
    keys were revoked: `run()` until cancelled, reconnecting after a lost connection.

    While it is not listening, `pages` keeps nothing, and a key revoked by another process
    is refused once `keys` has forgotten it (`key_cache_seconds`).
    """

    def __init__(
        self, database_url: str, pages: PageCache, keys: LiveKeys, idle_check: float = 1.0
    ) -> None:
        self.database_url = database_url
        self.pages = pages
        self.keys = keys
        self.idle_check = idle_check  # seconds between checks that the connection is alive

    async def run(self) -> None:
        while True:
            try:
                async with await connect_async(self.database_url) as connection:
                    await connection.execute(f"LISTEN {ROUNDS}")
                    await connection.execute(f"LISTEN {KEYS}")
                    self.pages.set_listening(True)
                    log.info("listening for changed rounds and revoked keys")
                    while True:
                        async for note in connection.notifies(timeout=self.idle_check):
                            if note.channel == KEYS:
                                self.keys.forget(note.payload)
                            else:
                                self.pages.changed(parse_rounds(note.payload))
                        # A dead connection shows here, not in notifies(); a half-open one
                        # would leave the check waiting, hence the time limit.
                        await asyncio.wait_for(
                            connection.execute("SELECT 1"), timeout=5 * self.idle_check
                        )
            except Exception as error:  # whatever it was, pages must not outlive it
                log.warning("not listening for changes (%r); pages are not kept", error)
            finally:
                self.pages.set_listening(False)
            await asyncio.sleep(self.idle_check)
