"""GET /queries pages of ready rounds, kept rendered until PostgreSQL says they changed.

A ready round's queries never change, but what its page says of them does: an item gets a
label, an annotator takes a lease. Triggers (migration 0007) tell each API process, through
LISTEN/NOTIFY (service/changes.py), which rounds a committed transaction touched, and the
process drops their pages; its own writes drop them at once. A process that is not
listening (SQLite, or its connection is down) keeps no page.
"""

from collections.abc import Iterable


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
