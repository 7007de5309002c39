"""PostgreSQL tells the API processes which API key was revoked

On channel ally_keys (service/changes.py), at commit: the revoked key's hash, so every API
process refuses it at once instead of after key_cache_seconds. SQLite has no
notifications: there the cache's time limit applies.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("""
        CREATE FUNCTION ally_notify_revoked_key() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('ally_keys', NEW.key_hash);
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER api_keys_notify_revoked AFTER UPDATE OF revoked_at ON api_keys
        FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
        EXECUTE FUNCTION ally_notify_revoked_key()
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER api_keys_notify_revoked ON api_keys")
    op.execute("DROP FUNCTION ally_notify_revoked_key()")
