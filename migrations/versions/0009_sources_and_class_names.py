"""examples.source: where each training example comes from (CSV line, image path, row); runs.class_names: the
names of the classes where the data names them

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ALTER TABLE (SQLite 3.35+): a batch rebuild of runs would cascade its drop to every run's rows
    op.add_column("examples", sa.Column("source", sa.String(length=1000), nullable=True))
    op.add_column("runs", sa.Column("class_names", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("examples", "source")
    op.drop_column("runs", "class_names")
