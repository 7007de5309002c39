"""API keys: random, shown once, stored as their sha256 (no FastAPI here: the CLI uses it)."""

import hashlib
import secrets

from sqlmodel import Session, col, select

from service.models import ApiKey, Role, utcnow

KEY_PREFIX = "ally_"


def hash_key(key: str) -> str:
    # A fast hash is enough: the keys carry 256 random bits, so there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, *, name: str, role: Role) -> tuple[ApiKey, str]:
    """A new key row (flushed) and the key itself, which is not stored anywhere."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, role=role, key_hash=hash_key(key), prefix=key[: len(KEY_PREFIX) + 6])
    session.add(row)
    session.flush()
    return row, key


def find_key(session: Session, key: str) -> ApiKey | None:
    """The live (not revoked) key row for `key`, in one indexed lookup."""
    return session.exec(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), col(ApiKey.revoked_at).is_(None))
    ).first()


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.exec(select(ApiKey).order_by(col(ApiKey.id))))


def revoke_key(session: Session, key_id: int) -> ApiKey | None:
    """Mark a key revoked (flushed); None when there is no such key."""
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        session.flush()
    return row
