"""API keys: random, shown once, stored as their sha256; the pools a key may see.

No request handling here: the CLI uses it too.
"""

import hashlib
import secrets
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, true
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


# A key's pools are stored with the key and never change (to change them, create a new key
# and revoke the old one), so each process reads them once per key: the hot routes then pay
# nothing for unrestricted keys. Keyed by the key's hash, which no other key ever shares.
_pools_by_key_hash: dict[str, frozenset[int]] = {}
_MAX_CACHED_KEYS = 100_000


def restricted_pools(session: Session, key: ApiKey) -> frozenset[int] | None:
    """The pools a restricted key may see (possibly none); None: every pool."""
    if not key.restricted or key.role == Role.admin:
        return None
    pools = _pools_by_key_hash.get(key.key_hash)
    if pools is None:
        pool_ids = session.exec(select(ApiKeyPool.pool_id).where(ApiKeyPool.key_id == key.id))
        pools = frozenset(pool_ids)
        if len(_pools_by_key_hash) >= _MAX_CACHED_KEYS:
            _pools_by_key_hash.clear()
        _pools_by_key_hash[key.key_hash] = pools
    return pools


def sees_pool(session: Session, key: ApiKey, pool_id: ColumnElement[int]) -> ColumnElement[bool]:
    """SQL: `key` may see the rows of the pool in `pool_id`.

    Routes add it to the query that loads the object, so another pool's object looks exactly
    like one that does not exist; past a key's first request it costs no round trip.
    """
    pools = restricted_pools(session, key)
    return true() if pools is None else pool_id.in_(sorted(pools))


class PoolScoped:
    """A statement built once, in two forms: for keys that see every pool, and with `sees_pool`
    for restricted keys, the key's pools bound as the parameter `pools`. For the hot routes,
    where building a statement costs more than running it."""

    def __init__(self, statement: Select[Any], pool_id: ColumnElement[int]) -> None:
        self.every_pool = statement
        self.in_pools = statement.where(pool_id.in_(bindparam("pools", expanding=True)))

    def for_key(self, session: Session, key: ApiKey) -> tuple[Select[Any], dict[str, Any]]:
        """The form for `key`, and the parameters it needs."""
        pools = restricted_pools(session, key)
        if pools is None:
            return self.every_pool, {}
        return self.in_pools, {"pools": sorted(pools)}


def find_key(session: Session, key: str) -> ApiKey | None:
    """The live (not revoked) key row for `key`, in one indexed lookup."""
    return _find_hashed(session, hash_key(key))


def _find_hashed(session: Session, key_hash: str) -> ApiKey | None:
    return session.exec(
        select(ApiKey).where(ApiKey.key_hash == key_hash, col(ApiKey.revoked_at).is_(None))
    ).first()


class LiveKeys:
    """Live keys by hash, each remembered for `ttl` seconds: most requests skip the look-up.

    A key revoked by another process (another API process, `ally keys revoke`) is refused
    at most `ttl` seconds after the revocation commits; `revoke_key` forgets it here at once.
    Only live keys are remembered, so unknown keys cannot fill the memory.
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._keys: dict[str, tuple[float, ApiKey]] = {}

    def remembered(self, key: str) -> ApiKey | None:
        """The key row if `key` was found live less than `ttl` seconds ago (no database)."""
        remembered = self._keys.get(hash_key(key))
        if remembered is None or remembered[0] <= self.clock():
            return None
        return remembered[1]

    def find(self, session: Session, key: str) -> ApiKey | None:
        """The live key row for `key`: remembered, else looked up (and remembered)."""
        key_hash = hash_key(key)
        remembered = self._keys.get(key_hash)
        if remembered is not None and remembered[0] > self.clock():
            return remembered[1]
        # Counted from before the look-up, so no answer outlives a revocation by over `ttl`.
        expires = self.clock() + self.ttl
        row = _find_hashed(session, key_hash)
        if row is None:
            self._keys.pop(key_hash, None)
            return None
        # A copy outside any session: requests on other threads read it at the same time.
        live = ApiKey(**row.model_dump())
        self._keys[key_hash] = (expires, live)
        return live

    def forget(self, key_hash: str) -> None:
        self._keys.pop(key_hash, None)


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
