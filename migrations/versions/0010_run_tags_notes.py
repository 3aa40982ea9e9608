"""runs.tags and runs.notes: a practitioner's labels and notes on a run

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ALTER TABLE (SQLite 3.35+): a batch rebuild of runs would cascade its drop to every run's rows
    op.add_column("runs", sa.Column("tags", sa.JSON(), nullable=True))
    op.add_column("runs", sa.Column("notes", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "notes")
    op.drop_column("runs", "tags")
