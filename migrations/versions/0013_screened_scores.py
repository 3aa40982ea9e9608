"""score_chunks layout 4: per-example records say whether they come from screening (``screened``: the output
layer's share of the sensitivities, mapped onto the exact pass's scale; sensitivity.screen)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # no schema change: older layouts read as before, none of their records screened


def downgrade() -> None:
    # rewrite layout-4 records as layout 3 (dropping ``screened``: screened records then read as exact)
    import numpy as np

    v3 = [("idx", "<i8"), ("rank", "<i4"), ("score", "<f4"), ("loo", "<f4"), ("prob", "<f4"), ("loo_mean", "<f4"),
          ("evals", "<i4"), ("scored", "<i4")]
    v4 = np.dtype(v3 + [("screened", "u1")])
    chunks = sa.table("score_chunks", sa.column("run_id"), sa.column("step"), sa.column("kind"), sa.column("chunk"),
                      sa.column("layout"), sa.column("data", sa.LargeBinary()))
    bind = op.get_bind()
    keys = bind.execute(sa.select(chunks.c.run_id, chunks.c.step, chunks.c.kind, chunks.c.chunk)
                        .where(chunks.c.layout == 4)).all()
    for run_id, step, kind, chunk in keys:
        where = ((chunks.c.run_id == run_id) & (chunks.c.step == step) & (chunks.c.kind == kind)
                 & (chunks.c.chunk == chunk))
        recs = np.frombuffer(bind.execute(sa.select(chunks.c.data).where(where)).scalar_one(), dtype=v4)
        old = np.zeros(len(recs), dtype=np.dtype(v3))
        for name, _ in v3:
            old[name] = recs[name]
        bind.execute(chunks.update().where(where).values(data=old.tobytes(), layout=3))
