"""api_keys.restricted: a restricted key whose pool rows are gone sees no pool, not every pool

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN, also on SQLite: a batch copy would drop api_keys, which
    # api_key_pools refers to.
    op.add_column(
        "api_keys",
        sa.Column("restricted", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.execute(
        "UPDATE api_keys SET restricted = TRUE WHERE id IN (SELECT key_id FROM api_key_pools)"
    )


def downgrade() -> None:
    op.drop_column("api_keys", "restricted")
