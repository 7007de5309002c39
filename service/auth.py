"""API keys: random, shown once, stored as their sha256; the pools a key may see.

No request handling here: the CLI uses it too.
"""

import hashlib
import math
import secrets
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, bindparam, true
from sqlmodel import Session, col, select

from service.errors import InvalidKeyScope, PoolNotFound
from service.models import ApiKey, ApiKeyPool, Pool, Role, utcnow
from service.settings import settings

KEY_PREFIX = "ally_"


def hash_key(key: str) -> str:
    # A fast hash is enough: the keys carry 256 random bits, so there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    session: Session, *, name: str, role: Role, pools: Collection[int] = ()
) -> tuple[ApiKey, str]:
    """A new key row (flushed) and the key itself, which is not stored anywhere.

    `pools` restricts an annotator key to those pools; without them it sees every pool.
    """
    if pools and role == Role.admin:
        raise InvalidKeyScope("an admin key sees every pool; only annotator keys take pools")
    pool_ids = sorted(set(pools))
    found = set(session.exec(select(Pool.id).where(col(Pool.id).in_(pool_ids))).all())
    missing = [pool_id for pool_id in pool_ids if pool_id not in found]
    if missing:
        raise PoolNotFound(f"no pools {missing}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name,
        role=role,
        key_hash=hash_key(key),
        prefix=key[: len(KEY_PREFIX) + 6],
        restricted=bool(pool_ids),
    )
    session.add(row)
    session.flush()
    for pool_id in pool_ids:
        session.add(ApiKeyPool(key_id=row.id, pool_id=pool_id))  # type: ignore[arg-type]
    session.flush()
    return row, key


def key_pools(session: Session, keys: Sequence[ApiKey]) -> list[list[int] | None]:
    """The pools each key is restricted to, in the keys' order; None: every pool."""
    restricted: dict[int | None, list[int]] = {}
    for key_id, pool_id in session.exec(
        select(ApiKeyPool.key_id, ApiKeyPool.pool_id)
        .where(col(ApiKeyPool.key_id).in_([key.id for key in keys]))
        .order_by(col(ApiKeyPool.key_id), col(ApiKeyPool.pool_id))
    ):
        restricted.setdefault(key_id, []).append(pool_id)
    return [restricted.get(key.id, []) if key.restricted else None for key in keys]


@dataclass(frozen=True)
class Caller:
    """Who sends a request: a live key, with the pools it may see (None: every pool).

    A key's pools are fixed when it is created (to change them, create a new key and revoke
    the old one), so they are read with the key and remembered with it.
    """

    id: int
    name: str
    role: Role
    pools: frozenset[int] | None


def sees_pool(caller: Caller, pool_id: ColumnElement[int]) -> ColumnElement[bool]:
    """SQL: `caller` may see the rows of the pool in `pool_id`.

    Routes add it to the query that loads the object, so another pool's object looks exactly
    like one that does not exist.
    """
    return true() if caller.pools is None else pool_id.in_(sorted(caller.pools))


def find_key(session: Session, key: str) -> Caller | None:
    """The live (not revoked) key `key`, with its pools, in one indexed lookup."""
    return _find_hashed(session, hash_key(key))


# The key with each of its pools (or with None, when it has none), by hash.
_LIVE_KEY = (
    select(ApiKey.id, ApiKey.name, ApiKey.role, ApiKey.restricted, ApiKeyPool.pool_id)
    .outerjoin(ApiKeyPool, col(ApiKeyPool.key_id) == col(ApiKey.id))
    .where(ApiKey.key_hash == bindparam("key_hash"), col(ApiKey.revoked_at).is_(None))
)


def _find_hashed(session: Session, key_hash: str) -> Caller | None:
    rows = session.connection().execute(_LIVE_KEY, {"key_hash": key_hash}).all()
    if not rows:
        return None
    key_id, name, role, restricted, _ = rows[0]
    # Fails closed: a restricted key whose pool rows are lost sees no pool, not every pool.
    pools = frozenset(r.pool_id for r in rows if r.pool_id is not None) if restricted else None
    return Caller(key_id, name, Role(role), None if role == Role.admin else pools)


@dataclass(frozen=True)
class _Found:
    caller: Caller
    at: float  # when its look-up began
    epoch: int | None  # the change feed's listening epoch when it began, if it was listening


class LiveKeys:
    """Live keys by hash, remembered so that most requests skip the look-up.

    A key found live is trusted for `ttl` seconds, and after that for as long as the change
    feed (service/changes.py) vouches for it: the feed has been listening since before the
    look-up and was last heard less than `ttl` seconds ago, so a change to the key it has not
    told is that recent. Either way a key revoked (or changed) by another process is refused
    at most `ttl` seconds after the change commits; `revoke_key` and the feed's
    notifications forget it at once. Only live keys are remembered, so unknown keys cannot
    fill the memory.

    `find` runs on worker threads, the feed on the event loop: `_lock` keeps a key from
    being remembered as vouched for after a concurrent `forget` that may have been its own.
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._keys: dict[str, _Found] = {}
        self._lock = threading.Lock()
        self._listening = False
        self._epoch = 0  # counts the feed's starts and stops
        self._heard = -math.inf  # every change committed before this has been told
        self._forget_count = 0

    def remembered(self, key: str) -> Caller | None:
        """The caller if `key` is trusted without a look-up (no database)."""
        found = self._keys.get(hash_key(key))
        return found.caller if found is not None and self._trusted(found) else None

    def find(self, session: Session, key: str) -> Caller | None:
        """The caller with `key`: remembered, else looked up (and remembered)."""
        key_hash = hash_key(key)
        found = self._keys.get(key_hash)
        if found is not None and self._trusted(found):
            return found.caller
        # Taken before the look-up, so no answer outlives a change it missed by over `ttl`.
        at, forget_count = self.clock(), self._forget_count
        epoch = self._epoch if self._listening else None
        caller = _find_hashed(session, key_hash)
        with self._lock:
            if caller is None:
                self._keys.pop(key_hash, None)
                return None
            if forget_count != self._forget_count:  # perhaps this key's, told too early
                epoch = None
            self._keys[key_hash] = _Found(caller, at, epoch)
        return caller

    def forget(self, key_hash: str) -> None:
        with self._lock:
            self._forget_count += 1
            self._keys.pop(key_hash, None)

    def set_listening(self, listening: bool) -> None:
        """The feed started or stopped listening: it vouches for no key found before."""
        self._epoch += 1
        self._listening = listening
        self._heard = -math.inf

    def heard(self, at: float) -> None:
        """The feed has told every change committed before `at` (on `clock`)."""
        self._heard = at

    def _trusted(self, found: _Found) -> bool:
        now = self.clock()
        vouched = found.epoch == self._epoch and now < self._heard + self.ttl
        return now < found.at + self.ttl or vouched


live_keys = LiveKeys(ttl=settings.key_cache_seconds)


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.exec(select(ApiKey).order_by(col(ApiKey.id))))


def revoke_key(session: Session, key_id: int) -> ApiKey | None:
    """Mark a key revoked (flushed); None when there is no such key."""
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        session.flush()
        live_keys.forget(row.key_hash)
    return row
