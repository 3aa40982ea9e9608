"""deleted_runs: the uids of deleted runs, whose checkpoint folders the workers remove

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("deleted_runs",
                    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
                    sa.Column("uid", sa.String(32), nullable=False),
                    sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False))


def downgrade() -> None:
    op.drop_table("deleted_runs")
