"""influence_queries: which training examples made a finished run's predictions, asked through the API and answered
by a worker; test_examples: each test example's label, thumbnail and, at the latest evaluation, prediction and loss

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "influence_queries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False, server_default="pending"),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_influence_queries_status", "influence_queries", ["status"])
    op.create_index("ix_influence_queries_run_id", "influence_queries", ["run_id"])
    op.create_table(
        "test_examples",
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("idx", sa.Integer(), primary_key=True),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("thumbnail", sa.LargeBinary(), nullable=True),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("predicted", sa.Integer(), nullable=True),
        sa.Column("prob", sa.Float(), nullable=True),
        sa.Column("loss", sa.Float(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("test_examples")
    op.drop_table("influence_queries")
