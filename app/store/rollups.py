"""Curve rollups: per bucket of steps at three widths, the min and max with their steps, so that a curve of any
length comes back downsampled to a bounded number of points without reading every point."""

from __future__ import annotations

import numpy as np
from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from app.store.models import Metric, MetricRollup

LEVELS = (16, 256, 4096)  # rollup bucket widths in steps


def refresh_rollups(s: Session, run_id: int, touched: dict[str, list[int]]) -> None:
    """Recompute the rollup buckets that contain the touched steps, from the points themselves: at each width only
    the buckets those steps fall in (a bucket's rows are rewritten, the others kept). Series touched at the same steps
    (an evaluation's thirty-odd metrics) are read, cleared and written together: three statements per top-level
    bucket, not three per series."""
    top = LEVELS[-1]
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, steps in touched.items():
        groups.setdefault(tuple(sorted(set(steps))), []).append(name)
    rows: list[dict] = []
    for steps, names in groups.items():
        at = np.asarray(steps, dtype=np.int64)
        keys = {lv: np.unique(at // lv) for lv in LEVELS}
        for b in keys[top]:
            lo, hi = int(b) * top, (int(b) + 1) * top - 1
            pts = s.execute(select(Metric.name, Metric.step, Metric.value).where(
                Metric.run_id == run_id, Metric.name.in_(names), Metric.step >= lo, Metric.step <= hi)).all()
            mine = {lv: [int(k) for k in keys[lv] if lo <= k * lv <= hi] for lv in LEVELS}
            s.execute(delete(MetricRollup).where(
                MetricRollup.run_id == run_id, MetricRollup.name.in_(names),
                or_(*[and_(MetricRollup.level == lv, MetricRollup.bucket.in_(mine[lv])) for lv in LEVELS])))
            series: dict[str, list] = {}
            for name, step, value in pts:
                series.setdefault(name, []).append((step, value))
            for name, part in series.items():
                rows += _rows(run_id, name, part, mine)
    if rows:
        s.execute(MetricRollup.__table__.insert(), rows)


def _rows(run_id: int, name: str, pts: list, only: dict[int, list[int]] | None = None) -> list[dict]:
    """The rollup rows of one series' points (``only``: per width, the buckets wanted; default every one)."""
    st = np.array([p[0] for p in pts], dtype=np.int64)
    val = np.array([np.nan if p[1] is None else p[1] for p in pts], dtype=np.float64)
    rows = []
    for lv in LEVELS:
        keys = st // lv
        for key in np.unique(keys) if only is None else only[lv]:
            m = keys == key
            if not m.any():
                continue
            v, k = val[m], st[m]
            ok = np.isfinite(v)
            if ok.any():
                i, j = int(np.nanargmin(v)), int(np.nanargmax(v))
                rows.append({"run_id": run_id, "name": name, "level": lv, "bucket": int(key), "n": int(m.sum()),
                             "min_step": int(k[i]), "min_value": float(v[i]), "max_step": int(k[j]),
                             "max_value": float(v[j])})
            else:
                rows.append({"run_id": run_id, "name": name, "level": lv, "bucket": int(key),
                             "n": int(m.sum()), "min_step": int(k[0]), "min_value": None,
                             "max_step": int(k[0]), "max_value": None})
    return rows


def merge_rollups(rows, max_points: int) -> list[tuple[int, float | None]]:
    """Group rollup rows into at most max_points // 2 buckets, each giving its min and max at their steps."""
    if not rows:
        return []
    groups = -(-len(rows) // max(1, max_points // 2))
    out: list[tuple[int, float | None]] = []
    for g in range(0, len(rows), groups):
        part = rows[g : g + groups]
        finite_part = [r for r in part if r[2] is not None]
        if not finite_part:
            out.append((part[0][1], None))
            continue
        lo = min(finite_part, key=lambda r: r[2])
        hi = max(finite_part, key=lambda r: r[4])
        pts = sorted({(lo[1], lo[2]), (hi[3], hi[4])})
        out.extend(pts)
    return out
