"""one queued or running round per pool: a partial unique index

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    # Fails if a pool already has two active rounds: cancel one of them first.
    op.create_index(
        "ux_rounds_pool_id_active",
        "rounds",
        ["pool_id"],
        unique=True,
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("ux_rounds_pool_id_active", table_name="rounds")
