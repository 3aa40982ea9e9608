"""Named metric series of a run (train_nll, loo, test_nll, …): points, their names, and curves downsampled from
the rollups, as a mixin of ``Store``."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.store.engine import NotFound
from app.store.models import Metric, MetricRollup, Run, finite
from app.store.rollups import LEVELS, merge_rollups, refresh_rollups


class MetricSeries:
    """Mixed into ``Store``, whose ``session`` it uses."""

    def session(self, write: bool = False) -> Session:
        raise NotImplementedError

    def log_metrics(self, run_id: int, name: str, steps: Sequence[int], values: Sequence[float]) -> None:
        """Append (or replace) points of a series, e.g. a per-step training loss."""
        if len(steps) != len(values):
            raise ValueError(f"{len(steps)} steps but {len(values)} values")
        with self.session(write=True) as s, s.begin():
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            steps = [int(x) for x in steps]
            for lo in range(0, len(steps), 10000):
                s.execute(delete(Metric).where(Metric.run_id == run_id, Metric.name == name,
                                               Metric.step.in_(steps[lo : lo + 10000])))
            s.execute(Metric.__table__.insert(), [{"run_id": run_id, "name": name, "step": st, "value": finite(v)}
                                                  for st, v in zip(steps, values)])
            refresh_rollups(s, run_id, {name: steps})

    def metric_names(self, run_id: int) -> list[str]:
        """The names of the run's stored series (the metric index serves it)."""
        with self.session() as s:
            return list(s.scalars(select(Metric.name).where(Metric.run_id == run_id).distinct().order_by(Metric.name)))

    def curve(self, run_id: int, name: str, since_step: int | None = None,
              max_points: int = 2000) -> list[tuple[int, float | None]]:
        """A metric series; above ``max_points`` downsampled on the server keeping every bucket's min and max
        (exact values at their exact steps), read from the rollups rather than from every point."""
        max_points = max(4, min(int(max_points), 10000))
        start = -1 if since_step is None else int(since_step)
        with self.session() as s:
            coarse = s.execute(select(func.sum(MetricRollup.n)).where(
                MetricRollup.run_id == run_id, MetricRollup.name == name, MetricRollup.level == LEVELS[-1],
                MetricRollup.bucket >= start // LEVELS[-1])).scalar() or 0
            if coarse <= 2 * max_points:
                pts = s.execute(select(Metric.step, Metric.value).where(
                    Metric.run_id == run_id, Metric.name == name, Metric.step > start).order_by(Metric.step)).all()
                if len(pts) <= max_points:
                    return [tuple(p) for p in pts]
            span = s.execute(select(func.min(MetricRollup.min_step), func.max(MetricRollup.max_step)).where(
                MetricRollup.run_id == run_id, MetricRollup.name == name, MetricRollup.level == LEVELS[-1],
                MetricRollup.bucket >= start // LEVELS[-1])).one()
            width = (span[1] or 0) - max(span[0] or 0, start + 1) + 1
            level = next((lv for lv in LEVELS if width / lv <= 2 * max_points), LEVELS[-1])
            rows = s.execute(select(MetricRollup.bucket, MetricRollup.min_step, MetricRollup.min_value,
                                    MetricRollup.max_step, MetricRollup.max_value)
                             .where(MetricRollup.run_id == run_id, MetricRollup.name == name,
                                    MetricRollup.level == level, MetricRollup.bucket > start // level)
                             .order_by(MetricRollup.bucket)).all()
        return merge_rollups(rows, max_points)
