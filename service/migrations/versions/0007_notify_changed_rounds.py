"""PostgreSQL tells the API processes which rounds' query pages a transaction changed

On channel ally_rounds (service/page_cache.py), at commit: the rounds that queried newly
labeled items, and the rounds whose queries got new leases. The payload is their ids,
comma-separated, or "*" when they would not fit in one notification. SQLite has no
notifications: its API keeps no page.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A notification's payload holds under 8,000 bytes.
NOTIFY = """
    IF rounds IS NOT NULL THEN
        PERFORM pg_notify('ally_rounds', CASE WHEN length(rounds) > 7000 THEN '*' ELSE rounds END);
    END IF;
    RETURN NULL;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"""
        CREATE FUNCTION ally_notify_labeled_rounds() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE rounds text;
        BEGIN
            SELECT string_agg(DISTINCT queries.round_id::text, ',') INTO rounds
            FROM queries JOIN new_labels ON queries.item_id = new_labels.item_id;
            {NOTIFY}
        END $$
    """)
    op.execute("""
        CREATE TRIGGER labels_notify_rounds AFTER INSERT ON labels
        REFERENCING NEW TABLE AS new_labels
        FOR EACH STATEMENT EXECUTE FUNCTION ally_notify_labeled_rounds()
    """)
    op.execute(f"""
        CREATE FUNCTION ally_notify_leased_rounds() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE rounds text;
        BEGIN
            SELECT string_agg(DISTINCT round_id::text, ',') INTO rounds FROM leased_queries;
            {NOTIFY}
        END $$
    """)
    op.execute("""
        CREATE TRIGGER queries_notify_rounds AFTER UPDATE ON queries
        REFERENCING NEW TABLE AS leased_queries
        FOR EACH STATEMENT EXECUTE FUNCTION ally_notify_leased_rounds()
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER queries_notify_rounds ON queries")
    op.execute("DROP FUNCTION ally_notify_leased_rounds()")
    op.execute("DROP TRIGGER labels_notify_rounds ON labels")
    op.execute("DROP FUNCTION ally_notify_labeled_rounds()")
