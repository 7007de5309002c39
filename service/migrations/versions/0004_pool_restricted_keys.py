"""annotator keys may be restricted to some pools: the api_key_pools table

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing keys get no rows: they stay unrestricted, as they were.
    op.create_table(
        "api_key_pools",
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_api_key_pools_key_id_api_keys")
        ),
        sa.ForeignKeyConstraint(
            ["pool_id"], ["pools.id"], name=op.f("fk_api_key_pools_pool_id_pools")
        ),
        sa.PrimaryKeyConstraint("key_id", "pool_id", name=op.f("pk_api_key_pools")),
    )


def downgrade() -> None:
    # Restricted keys would silently see every pool: revoke them rather than widen them.
    op.execute(
        "UPDATE api_keys SET revoked_at = CURRENT_TIMESTAMP "
        "WHERE revoked_at IS NULL AND id IN (SELECT key_id FROM api_key_pools)"
    )
    op.drop_table("api_key_pools")
