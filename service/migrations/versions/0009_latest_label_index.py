"""Labels indexed by (item, annotator, id): an annotator's latest label of an item is one
index descent

The label writer reads it with ORDER BY id DESC LIMIT 1. On (item, annotator) alone, a
plan may instead walk the primary key backwards from the newest label, filtering: through
the whole table for a pair that has no label yet.

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_labels_item_id_annotator_id", "labels", ["item_id", "annotator", "id"])
    op.drop_index("ix_labels_item_id_annotator", table_name="labels")


def downgrade() -> None:
    op.create_index("ix_labels_item_id_annotator", "labels", ["item_id", "annotator"])
    op.drop_index("ix_labels_item_id_annotator_id", table_name="labels")
