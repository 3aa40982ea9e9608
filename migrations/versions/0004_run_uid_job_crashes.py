"""runs.uid: a run's unique identity, which binds its checkpoints (run ids restart with a new database);
jobs.crashes: how many times a worker died holding the job (the queue fails it at a cap and moves on)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("uid", sa.String(length=32), nullable=True))
    runs = sa.table("runs", sa.column("id"), sa.column("uid"))
    bind = op.get_bind()
    for (run_id,) in bind.execute(sa.select(runs.c.id)).all():
        bind.execute(runs.update().where(runs.c.id == run_id).values(uid=uuid.uuid4().hex))
    # no NOT NULL: on SQLite it would copy the table, whose drop cascades to every run's rows (the model fills it)
    op.create_index("ix_runs_uid", "runs", ["uid"], unique=True)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("crashes", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN crashes")
    op.drop_index("ix_runs_uid", table_name="runs")
    op.execute("ALTER TABLE runs DROP COLUMN uid")  # in place (SQLite ≥ 3.35): no table copy, no cascade
