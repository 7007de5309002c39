"""service.auth.LiveKeys: a key found live is trusted for `ttl`, and past it only while the
change feed vouches for it, so a revocation nobody told is refused within `ttl`."""

import pytest

from service import auth
from service.auth import Caller, LiveKeys, hash_key
from service.models import Role

TTL = 1.0
KEY = "ally_alice"
ALICE = Caller(1, "alice", Role.annotator, None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hashes looked up in the database, which holds ALICE live (a stand-in for it)."""
    seen: list[str] = []

    def find_hashed(session: object, key_hash: str) -> Caller | None:
        seen.append(key_hash)
        return ALICE if key_hash == hash_key(KEY) else None

    monkeypatch.setattr(auth, "_find_hashed", find_hashed)
    return seen


def test_without_a_feed_a_key_is_trusted_for_ttl_after_its_look_up(
    clock: Clock, lookups: list[str]
) -> None:
    keys = LiveKeys(TTL, clock)
    assert keys.remembered(KEY) is None  # never looked up
    assert keys.find(None, KEY) == ALICE  # type: ignore[arg-type]
    clock.now += TTL * 0.9
    assert keys.remembered(KEY) == ALICE
    assert keys.find(None, KEY) == ALICE  # type: ignore[arg-type]
    assert len(lookups) == 1
    clock.now += TTL * 0.2
    assert keys.remembered(KEY) is None
    assert keys.find(None, KEY) == ALICE  # type: ignore[arg-type]
    assert len(lookups) == 2


def test_a_feed_heard_within_ttl_vouches_for_a_key_past_its_ttl(
    clock: Clock, lookups: list[str]
) -> None:
    keys = LiveKeys(TTL, clock)
    keys.set_listening(True)
    keys.find(None, KEY)  # type: ignore[arg-type]
    for _ in range(10):
        clock.now += TTL * 0.5
        keys.heard(clock.now)
        assert keys.remembered(KEY) == ALICE
    assert len(lookups) == 1

    # The feed goes quiet (a check that is not answered): trusted for ttl after it was heard.
    clock.now += TTL * 0.9
    assert keys.remembered(KEY) == ALICE
    clock.now += TTL * 0.2
    assert keys.remembered(KEY) is None


def test_a_feed_that_stopped_listening_vouches_for_nothing(
    clock: Clock, lookups: list[str]
) -> None:
    keys = LiveKeys(TTL, clock)
    keys.set_listening(True)
    keys.find(None, KEY)  # type: ignore[arg-type]
    clock.now += TTL * 2
    keys.heard(clock.now)
    assert keys.remembered(KEY) == ALICE

    keys.set_listening(False)
    assert keys.remembered(KEY) is None
    # Listening again, it cannot tell what was revoked in between: the key is looked up.
    keys.set_listening(True)
    keys.heard(clock.now)
    assert keys.remembered(KEY) is None
    keys.find(None, KEY)  # type: ignore[arg-type]
    assert len(lookups) == 2
    clock.now += TTL * 2
    keys.heard(clock.now)
    assert keys.remembered(KEY) == ALICE


def test_a_key_found_before_the_feed_listened_is_trusted_only_for_ttl(
    clock: Clock, lookups: list[str]
) -> None:
    keys = LiveKeys(TTL, clock)
    keys.find(None, KEY)  # type: ignore[arg-type]
    keys.set_listening(True)
    clock.now += TTL * 2
    keys.heard(clock.now)
    assert keys.remembered(KEY) is None


def test_a_key_forgotten_during_a_look_up_is_not_vouched_for(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look-up read the key live, then its revocation was told before the answer was
    remembered: the feed cannot vouch for that answer."""
    keys = LiveKeys(TTL, clock)
    keys.set_listening(True)

    def revoked_meanwhile(session: object, key_hash: str) -> Caller:
        keys.forget(key_hash)
        return ALICE

    monkeypatch.setattr(auth, "_find_hashed", revoked_meanwhile)
    keys.find(None, KEY)  # type: ignore[arg-type]
    assert keys.remembered(KEY) == ALICE  # within ttl of the look-up, as without a feed
    clock.now += TTL * 1.1
    keys.heard(clock.now)
    assert keys.remembered(KEY) is None


def test_a_forgotten_key_is_looked_up_again(clock: Clock, lookups: list[str]) -> None:
    keys = LiveKeys(TTL, clock)
    keys.set_listening(True)
    keys.find(None, KEY)  # type: ignore[arg-type]
    keys.forget(hash_key(KEY))  # revoked: by this process, or told by the feed
    assert keys.remembered(KEY) is None
    keys.find(None, KEY)  # type: ignore[arg-type]
    assert len(lookups) == 2


def test_unknown_keys_are_not_remembered(clock: Clock, lookups: list[str]) -> None:
    keys = LiveKeys(TTL, clock)
    keys.set_listening(True)
    keys.heard(clock.now)
    assert keys.find(None, "ally_mallory") is None  # type: ignore[arg-type]
    assert keys.find(None, "ally_mallory") is None  # type: ignore[arg-type]
    assert len(lookups) == 2


def test_the_trust_counts_from_before_the_look_up(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revocation may commit while the look-up runs: its ttl starts before it."""
    keys = LiveKeys(TTL, clock)

    def slow_look_up(session: object, key_hash: str) -> Caller:
        clock.now += TTL * 0.6
        return ALICE

    monkeypatch.setattr(auth, "_find_hashed", slow_look_up)
    keys.find(None, KEY)  # type: ignore[arg-type]
    clock.now += TTL * 0.5
    assert keys.remembered(KEY) is None


@pytest.mark.parametrize("listening_after", [True, False])
def test_a_key_found_while_the_feed_restarted_is_not_vouched_for(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, listening_after: bool
) -> None:
    """The feed stopped during the look-up (and perhaps listened again): a change told in
    between was missed, so the answer gets only its own ttl."""
    keys = LiveKeys(TTL, clock)
    keys.set_listening(True)

    def look_up_across_a_restart(session: object, key_hash: str) -> Caller:
        keys.set_listening(False)
        if listening_after:
            keys.set_listening(True)
        return ALICE

    monkeypatch.setattr(auth, "_find_hashed", look_up_across_a_restart)
    keys.find(None, KEY)  # type: ignore[arg-type]
    clock.now += TTL * 1.1
    keys.heard(clock.now)
    assert keys.remembered(KEY) is None


def test_with_no_time_to_trust_every_request_looks_its_key_up(
    clock: Clock, lookups: list[str]
) -> None:
    keys = LiveKeys(0, clock)
    keys.set_listening(True)
    keys.find(None, KEY)  # type: ignore[arg-type]
    keys.heard(clock.now)
    assert keys.remembered(KEY) is None
    keys.find(None, KEY)  # type: ignore[arg-type]
    assert len(lookups) == 2
