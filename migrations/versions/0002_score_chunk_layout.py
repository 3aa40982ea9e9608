"""score_chunks.layout: per-example records gain each example's running mean LOO loss (layout 2)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # existing chunks keep their bytes and read as layout 1; the next evaluation of a run rebuilds the means
    with op.batch_alter_table("score_chunks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("layout", sa.SmallInteger(), server_default="1", nullable=False))


def downgrade() -> None:
    # rewrite layout-2 records as layout 1 (dropping the running means, which the upgrade path rebuilds)
    import numpy as np

    v1 = [("idx", "<i8"), ("rank", "<i4"), ("score", "<f4"), ("loo", "<f4"), ("prob", "<f4")]
    v2 = np.dtype(v1 + [("loo_mean", "<f4"), ("evals", "<i4")])
    chunks = sa.table("score_chunks", sa.column("run_id"), sa.column("step"), sa.column("kind"), sa.column("chunk"),
                      sa.column("layout"), sa.column("data", sa.LargeBinary()))
    bind = op.get_bind()
    bind.execute(sa.delete(chunks).where(chunks.c.kind == "mean"))
    keys = bind.execute(sa.select(chunks.c.run_id, chunks.c.step, chunks.c.kind, chunks.c.chunk)
                        .where(chunks.c.layout == 2)).all()
    for run_id, step, kind, chunk in keys:
        where = ((chunks.c.run_id == run_id) & (chunks.c.step == step) & (chunks.c.kind == kind)
                 & (chunks.c.chunk == chunk))
        recs = np.frombuffer(bind.execute(sa.select(chunks.c.data).where(where)).scalar_one(), dtype=v2)
        old = np.zeros(len(recs), dtype=np.dtype(v1))
        for name, _ in v1:
            old[name] = recs[name]
        bind.execute(chunks.update().where(where).values(data=old.tobytes(), layout=1))
    with op.batch_alter_table("score_chunks", schema=None) as batch_op:
        batch_op.drop_column("layout")
