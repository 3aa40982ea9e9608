"""Influence queries on finished runs, as a small queue beside the jobs': the API submits, a worker claims one
under a lease (a dead worker's query is taken again), answers it from the run's final model
(worker.influence.query_run) and writes the rows or the error."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.store.engine import NotFound
from app.store.models import InfluenceQuery, Run, utcnow

MAX_TEST = 100  # test examples per query


class InfluenceQueries:
    """Mixed into ``Store``, whose ``session`` and ``dialect`` it uses."""

    dialect: str

    def session(self, write: bool = False) -> Session:
        raise NotImplementedError

    def submit_influence(self, run_id: int, test: list[int], k: int = 10, predicted: bool = False,
                         step: int | None = None) -> InfluenceQuery:
        """Queue a query (at the final model, or at an evaluation's kept state with ``step``); one on a queued or
        running run waits until the run ends."""
        if not 1 <= len(test) <= MAX_TEST:
            raise ValueError(f"give 1 to {MAX_TEST} test examples, not {len(test)}")
        with self.session(write=True) as s, s.begin():
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            request = {"test": [int(i) for i in test], "k": int(k), "predicted": bool(predicted)}
            if step is not None:
                request["step"] = int(step)
            query = InfluenceQuery(run_id=run_id, request=request)
            s.add(query)
        return query

    def record_influence(self, run_id: int, request: dict, result: list) -> InfluenceQuery:
        """An answered query computed elsewhere (``ivon-diag influence``), stored so that the dashboard shows it."""
        with self.session(write=True) as s, s.begin():
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            query = InfluenceQuery(run_id=run_id, request=request, result=result, status="done",
                                   finished_at=utcnow())
            s.add(query)
        return query

    def claim_influence(self, worker_id: str, lease_seconds: float = 300.0) -> InfluenceQuery | None:
        """The oldest pending query whose run has ended, or a running one whose worker's lease expired."""
        now = utcnow()
        claimable = or_(InfluenceQuery.status == "pending",
                        and_(InfluenceQuery.status == "running", InfluenceQuery.lease_expires_at < now))
        ended = select(Run.id).where(Run.status.not_in(("queued", "running")))
        q = (select(InfluenceQuery).where(claimable, InfluenceQuery.run_id.in_(ended))
             .order_by(InfluenceQuery.id).limit(1))
        if self.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        with self.session(write=True) as s, s.begin():
            query = s.scalars(q).first()
            if query is None:
                return None
            query.status, query.worker_id = "running", worker_id
            query.lease_expires_at = now + timedelta(seconds=lease_seconds)
        return query

    def finish_influence(self, query_id: int, result: list | None = None, error: str | None = None) -> None:
        with self.session(write=True) as s, s.begin():
            query = s.get(InfluenceQuery, query_id)
            if query is None:
                raise NotFound(f"influence query {query_id} not found")
            query.status = "failed" if error is not None else "done"
            query.result, query.error, query.finished_at = result, error, utcnow()

    def get_influence(self, query_id: int) -> InfluenceQuery:
        with self.session() as s:
            query = s.get(InfluenceQuery, query_id)
            if query is None:
                raise NotFound(f"influence query {query_id} not found")
            return query

    def list_influence(self, run_id: int, limit: int = 100) -> list[InfluenceQuery]:
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            q = (select(InfluenceQuery).where(InfluenceQuery.run_id == run_id).order_by(InfluenceQuery.id.desc())
                 .limit(min(limit, 1000)))
            return list(s.scalars(q))
