"""What a practitioner may set on a run (name, tags, notes) and the list's filters: checked in one place for the
API, the CLI and the store."""

from __future__ import annotations

import re
from collections.abc import Sequence

from sqlalchemy import String, cast, func, select
from sqlalchemy.orm import Session

from app.store.engine import NotFound
from app.store.models import DeletedRun, Evaluation, Run

TAG = re.compile(r"^[A-Za-z0-9_.:-]{1,50}$")
MAX_TAGS, MAX_NOTES = 20, 10_000


def check_run_fields(name: str | None, tags: list[str] | None, notes: str | None) -> dict:
    """The columns to set; ValueError names the field and what it accepts."""
    values: dict = {}
    if name is not None:
        if not 1 <= len(name) <= 200 or "\x00" in name or not name.strip():
            raise ValueError("name: 1 to 200 characters, not blank, no NUL")
        values["name"] = name
    if tags is not None:
        bad = [t for t in tags if not isinstance(t, str) or not TAG.match(t)]
        if bad or len(tags) > MAX_TAGS:
            raise ValueError(f"tags: at most {MAX_TAGS}, each 1 to 50 of letters, digits and _ . : - "
                             f"({len(bad)} not)")
        values["tags"] = sorted(set(tags))
    if notes is not None:
        if len(notes) > MAX_NOTES or "\x00" in notes:
            raise ValueError(f"notes: at most {MAX_NOTES} characters, no NUL")
        values["notes"] = notes
    return values


def run_filters(status: str | None, tag: str | None, name: str | None) -> list:
    """SQL conditions for the run list, alike on SQLite and PostgreSQL."""
    conds = []
    if status:
        conds.append(Run.status == status)
    if tag:
        if not TAG.match(tag):
            raise ValueError("tag: 1 to 50 of letters, digits and _ . : -")
        pattern = '%"' + tag.replace("_", "\\_") + '"%'  # the JSON text holds each tag quoted
        conds.append(cast(Run.tags, String).like(pattern, escape="\\"))
    if name:
        escaped = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conds.append(func.lower(Run.name).like(f"%{escaped.lower()}%", escape="\\"))
    return conds


class RunManagement:
    """Mixed into ``Store``, whose ``session`` it uses."""

    def session(self, write: bool = False) -> Session:
        raise NotImplementedError

    def count_runs(self, status: str | None = None, tag: str | None = None, name: str | None = None) -> int:
        q = select(func.count()).select_from(Run)
        for cond in run_filters(status, tag, name):
            q = q.where(cond)
        with self.session() as s:
            return s.scalar(q) or 0

    def update_run(self, run_id: int, name: str | None = None, tags: list[str] | None = None,
                   notes: str | None = None) -> Run:
        """Rename a run, replace its tags or its notes (what is None stays); ValueError names a bad value."""
        values = check_run_fields(name, tags, notes)
        with self.session(write=True) as s, s.begin():
            run = s.get(Run, run_id)
            if run is None:
                raise NotFound(f"run {run_id} not found")
            for key, value in values.items():
                setattr(run, key, value)
            s.flush()
            s.expunge(run)
            return run

    def best_loo(self, run_ids: Sequence[int]) -> dict[int, tuple[int, float]]:
        """Each run's lowest LOO estimate and its step (the earliest where tied), in one query."""
        if not run_ids:
            return {}
        low = (select(Evaluation.run_id, func.min(Evaluation.loo).label("loo"))
               .where(Evaluation.run_id.in_(list(run_ids))).group_by(Evaluation.run_id).subquery())
        q = (select(Evaluation.run_id, func.min(Evaluation.step), low.c.loo)
             .join(low, (Evaluation.run_id == low.c.run_id) & (Evaluation.loo == low.c.loo))
             .group_by(Evaluation.run_id, low.c.loo))
        with self.session() as s:
            return {run_id: (step, loo) for run_id, step, loo in s.execute(q)}

    def latest_evaluations(self, run_ids: Sequence[int]) -> dict[int, Evaluation]:
        """Each run's latest evaluation (runs without one left out), in one query."""
        if not run_ids:
            return {}
        last = (select(Evaluation.run_id, func.max(Evaluation.step).label("step"))
                .where(Evaluation.run_id.in_(list(run_ids))).group_by(Evaluation.run_id).subquery())
        q = select(Evaluation).join(last, (Evaluation.run_id == last.c.run_id) & (Evaluation.step == last.c.step))
        with self.session() as s:
            return {e.run_id: e for e in s.scalars(q)}

    def deleted_uids(self, after: int = 0) -> list[tuple[int, str]]:
        """(id, uid) of the runs deleted since tombstone ``after``, oldest first."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(select(DeletedRun.id, DeletedRun.uid).where(DeletedRun.id > after)
                                                .order_by(DeletedRun.id))]
