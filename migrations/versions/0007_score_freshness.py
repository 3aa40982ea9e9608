"""score_chunks layout 3: per-example records say the step of their scoring (``scored``), so that an evaluation that
scored a slice of the examples carries the others' last records (worker.cadence's rotation)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # no schema change: layout 1 and 2 chunks read as before, their records scored at their own step


def downgrade() -> None:
    # rewrite layout-3 records as layout 2 (dropping ``scored``: carried records then read as scored at the step)
    import numpy as np

    v2 = [("idx", "<i8"), ("rank", "<i4"), ("score", "<f4"), ("loo", "<f4"), ("prob", "<f4"), ("loo_mean", "<f4"),
          ("evals", "<i4")]
    v3 = np.dtype(v2 + [("scored", "<i4")])
    chunks = sa.table("score_chunks", sa.column("run_id"), sa.column("step"), sa.column("kind"), sa.column("chunk"),
                      sa.column("layout"), sa.column("data", sa.LargeBinary()))
    bind = op.get_bind()
    keys = bind.execute(sa.select(chunks.c.run_id, chunks.c.step, chunks.c.kind, chunks.c.chunk)
                        .where(chunks.c.layout == 3)).all()
    for run_id, step, kind, chunk in keys:
        where = ((chunks.c.run_id == run_id) & (chunks.c.step == step) & (chunks.c.kind == kind)
                 & (chunks.c.chunk == chunk))
        recs = np.frombuffer(bind.execute(sa.select(chunks.c.data).where(where)).scalar_one(), dtype=v3)
        old = np.zeros(len(recs), dtype=np.dtype(v2))
        for name, _ in v2:
            old[name] = recs[name]
        bind.execute(chunks.update().where(where).values(data=old.tobytes(), layout=2))
