"""PostgreSQL tells the API processes of every change to an API key, not only revocations

On channel ally_keys (service/changes.py), at commit: the hash of each key whose row was
updated or deleted, or whose pool rows changed, however it was done (the API, `ally keys
revoke`, or SQL by hand). An API process trusts a key it found live for as long as it is
told of such changes (service/auth.py), so each must be told, not only revocations.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER api_keys_notify_revoked ON api_keys")
    op.execute("DROP FUNCTION ally_notify_revoked_key()")
    op.execute("""
        CREATE FUNCTION ally_notify_changed_key() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('ally_keys', OLD.key_hash);
            IF TG_OP = 'UPDATE' AND NEW.key_hash <> OLD.key_hash THEN
                PERFORM pg_notify('ally_keys', NEW.key_hash);
            END IF;
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER api_keys_notify_changed AFTER UPDATE OR DELETE ON api_keys
        FOR EACH ROW EXECUTE FUNCTION ally_notify_changed_key()
    """)
    op.execute("""
        CREATE FUNCTION ally_notify_changed_key_pools() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'DELETE' THEN
                PERFORM pg_notify('ally_keys', key_hash) FROM api_keys WHERE id = NEW.key_id;
            END IF;
            IF TG_OP <> 'INSERT' THEN
                PERFORM pg_notify('ally_keys', key_hash) FROM api_keys WHERE id = OLD.key_id;
            END IF;
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER api_key_pools_notify_changed AFTER INSERT OR UPDATE OR DELETE
        ON api_key_pools FOR EACH ROW EXECUTE FUNCTION ally_notify_changed_key_pools()
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER api_key_pools_notify_changed ON api_key_pools")
    op.execute("DROP FUNCTION ally_notify_changed_key_pools()")
    op.execute("DROP TRIGGER api_keys_notify_changed ON api_keys")
    op.execute("DROP FUNCTION ally_notify_changed_key()")
    # Migration 0008's, as it made them.
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
