"""examples.features and runs.feature_names: a tabular example's row as read, for its page

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("examples", sa.Column("features", sa.JSON(), nullable=True))
    op.add_column("runs", sa.Column("feature_names", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "feature_names")
    op.drop_column("examples", "features")
