"""service.page_cache.PageCache: a page is kept only while changes are told, and never one
read before its round changed."""

from service.changes import parse_rounds
from service.page_cache import PageCache

FIRST = (0, 50, "http://test/")
SECOND = (50, 50, "http://test/")


def listening_cache(most: int = 1000) -> PageCache:
    pages = PageCache(most=most)
    pages.set_listening(True)
    return pages


def test_nothing_is_kept_while_changes_are_not_told() -> None:
    pages = PageCache()
    assert pages.version() is None
    pages.put(1, FIRST, (7, b"page"), pages.version())
    assert pages.get(1, FIRST) is None


def test_a_kept_page_is_served_until_its_round_changes() -> None:
    pages = listening_cache()
    pages.put(1, FIRST, (7, b"one"), pages.version())
    pages.put(1, SECOND, (7, b"two"), pages.version())
    pages.put(2, FIRST, (7, b"other"), pages.version())
    assert pages.get(1, FIRST) == (7, b"one") and pages.get(1, SECOND) == (7, b"two")

    pages.changed([1])

    assert pages.get(1, FIRST) is None and pages.get(1, SECOND) is None
    assert pages.get(2, FIRST) == (7, b"other")
    pages.changed(None)
    assert pages.get(2, FIRST) is None


def test_a_page_read_before_its_round_changed_is_not_kept() -> None:
    pages = listening_cache()
    version = pages.version()  # the read begins ...
    pages.changed([1])  # ... a label commits and is told ...
    pages.put(1, FIRST, (7, b"stale"), version)  # ... the read ends, without that label
    assert pages.get(1, FIRST) is None

    version = pages.version()
    pages.changed([2])  # another round's change does not matter
    pages.put(1, FIRST, (7, b"fresh"), version)
    assert pages.get(1, FIRST) == (7, b"fresh")

    version = pages.version()
    pages.changed(None)  # every round changed
    pages.put(1, SECOND, (7, b"stale"), version)
    assert pages.get(1, SECOND) is None


def test_when_listening_stops_every_page_goes_and_none_read_before_is_kept() -> None:
    pages = listening_cache()
    pages.put(1, FIRST, (7, b"one"), pages.version())
    version = pages.version()

    pages.set_listening(False)

    assert pages.get(1, FIRST) is None
    pages.put(1, SECOND, (7, b"two"), version)
    assert pages.get(1, SECOND) is None
    assert pages.version() is None
    # Listening again: whatever changed meanwhile went untold, so older reads stay out.
    pages.set_listening(True)
    pages.put(1, SECOND, (7, b"two"), version)
    assert pages.get(1, SECOND) is None
    pages.put(1, SECOND, (7, b"two"), pages.version())
    assert pages.get(1, SECOND) == (7, b"two")


def test_at_most_most_pages_are_kept() -> None:
    pages = listening_cache(most=3)
    for round_id in (1, 2, 3):
        pages.put(round_id, FIRST, (7, b"page"), pages.version())
    pages.put(3, FIRST, (7, b"again"), pages.version())  # replaces: still three
    assert pages.get(1, FIRST) == (7, b"page")

    pages.put(4, FIRST, (7, b"page"), pages.version())

    kept = [r for r in (1, 2, 3, 4) if pages.get(r, FIRST) is not None]
    assert kept == [4]


def test_notifications_name_rounds_or_every_round() -> None:
    assert parse_rounds("3,17,4") == [3, 17, 4]
    assert parse_rounds("*") is None
    assert parse_rounds("") is None and parse_rounds("not ours") is None  # safe: every round
