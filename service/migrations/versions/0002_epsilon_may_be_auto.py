"""pools.default_epsilon may be "auto": store it as text

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch_op:
        batch_op.alter_column(
            "default_epsilon",
            existing_type=sa.Float(),
            type_=sa.String(20),
            existing_nullable=True,
            postgresql_using="default_epsilon::text",
        )


def downgrade() -> None:
    # Pools set to "auto" fall back to the strategy's own default.
    op.execute("UPDATE pools SET default_epsilon = NULL WHERE default_epsilon = 'auto'")
    with op.batch_alter_table("pools") as batch_op:
        batch_op.alter_column(
            "default_epsilon",
            existing_type=sa.String(20),
            type_=sa.Float(),
            existing_nullable=True,
            postgresql_using="default_epsilon::double precision",
        )
