"""pools.default_epsilon holds any float's text: the longest repr has 23 characters, not 20

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch_op:
        batch_op.alter_column(
            "default_epsilon",
            existing_type=sa.String(20),
            type_=sa.String(32),
            existing_nullable=True,
        )


def downgrade() -> None:
    # Texts longer than 20 characters are numbers nobody could have stored before.
    with op.batch_alter_table("pools") as batch_op:
        batch_op.alter_column(
            "default_epsilon",
            existing_type=sa.String(32),
            type_=sa.String(20),
            existing_nullable=True,
        )
