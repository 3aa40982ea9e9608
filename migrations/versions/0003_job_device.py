"""jobs.device: the device a run's config asks for, so that a worker claims only jobs it can place

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("device", sa.String(length=16), server_default="auto", nullable=False))
    # jobs not yet finished take their run's setting (configs written before this revision name none: "auto")
    jobs = sa.table("jobs", sa.column("id"), sa.column("run_id"), sa.column("state"), sa.column("device"))
    runs = sa.table("runs", sa.column("id"), sa.column("config", sa.JSON()))
    bind = op.get_bind()
    rows = bind.execute(sa.select(jobs.c.id, runs.c.config).join(runs, runs.c.id == jobs.c.run_id)
                        .where(jobs.c.state.in_(("queued", "running")))).all()
    for job_id, config in rows:
        if isinstance(config, str):
            config = json.loads(config)
        device = config.get("device") if isinstance(config, dict) else None
        if isinstance(device, str) and device and device != "auto":
            bind.execute(jobs.update().where(jobs.c.id == job_id).values(device=device[:16]))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("device")
