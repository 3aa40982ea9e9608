"""The job queue: runs' jobs claimed under a lease, kept alive by heartbeats, reclaimed when a worker dies."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.store.engine import NotFound
from app.store.models import Job, Run, utcnow


def job_device(config: dict | None) -> str:
    """The device a run's config asks for ("auto" when it names none)."""
    device = (config or {}).get("device") if isinstance(config, dict) else None
    return device[:16] if isinstance(device, str) and device else "auto"


class JobQueue:
    """Mixed into ``Store``, whose ``session`` it uses."""

    def session(self, write: bool = False) -> Session:
        raise NotImplementedError

    def enqueue_job(self, run_id: int) -> Job:
        with self.session(write=True) as s, s.begin():
            run = s.get(Run, run_id)
            if run is None:
                raise NotFound(f"run {run_id} not found")
            job = Job(run_id=run_id, device=job_device(run.config))
            s.add(job)
        return job

    def claim_job(self, worker_id: str, lease_seconds: float = 60.0, devices: Sequence[str] | None = None,
                  max_crashes: int = 3) -> Job | None:
        """Take the oldest queued job, or a running one whose lease expired (its worker died); with ``devices``,
        only a job whose config's device is one of them. A job whose lease has expired ``max_crashes`` times (a
        job that kills its worker: a crash in the data or the model) is failed instead, so the queue moves on."""
        now = utcnow()
        expired = and_(Job.state == "running", Job.lease_expires_at < now)
        claimable = or_(Job.state == "queued", expired)
        if devices is not None:
            claimable = and_(claimable, Job.device.in_(list(devices)))
        q = select(Job).where(claimable).order_by(Job.created_at, Job.id).limit(1)
        if self.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        with self.session(write=True) as s, s.begin():
            while (job := s.scalars(q).first()) is not None and job.state == "running" \
                    and job.crashes + 1 >= max_crashes:
                self._fail_crashed(s, job, now)
            if job is None:
                return None
            if job.state == "running":
                job.crashes += 1
            job.state, job.worker_id, job.attempts = "running", worker_id, job.attempts + 1
            job.heartbeat_at, job.lease_expires_at = now, now + timedelta(seconds=lease_seconds)
            s.execute(update(Run).where(Run.id == job.run_id, Run.status.in_(("queued", "running")))
                      .values(status="running", started_at=func.coalesce(Run.started_at, now)))
        return job

    @staticmethod
    def _fail_crashed(s: Session, job: Job, now) -> None:
        reason = (f"the worker running this job stopped without a word {job.crashes + 1} times (last: "
                  f"{job.worker_id}): failed so that the queue moves on; a crash in the data or the model is the "
                  "likely cause (see that worker's log)")
        job.state, job.error, job.crashes = "failed", reason, job.crashes + 1
        s.execute(update(Run).where(Run.id == job.run_id)
                  .values(status="failed", error=reason, finished_at=now))
        s.flush()

    def waiting_devices(self, devices: Sequence[str]) -> dict[str, int]:
        """Queued jobs that none of ``devices`` can take, counted by the device they ask for."""
        with self.session() as s:
            rows = s.execute(select(Job.device, func.count())
                             .where(Job.state == "queued", Job.device.not_in(list(devices)))
                             .group_by(Job.device)).all()
        return {d: n for d, n in rows}

    def heartbeat(self, job_id: int, worker_id: str, lease_seconds: float = 60.0) -> bool:
        """Extend the lease; False when the job is no longer this worker's (it was retaken or cancelled)."""
        now = utcnow()
        with self.session(write=True) as s, s.begin():
            res = s.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.state == "running")
                            .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds)))
            return res.rowcount == 1

    def finish_job(self, job_id: int, state: str, error: str | None = None) -> None:
        if state not in ("done", "failed", "cancelled", "queued"):
            raise ValueError(f"Invalid job state: {state!r}")
        with self.session(write=True) as s, s.begin():
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found")
            job.state, job.error = state, error
            if state == "queued":  # released: another worker may take it at once
                job.worker_id, job.lease_expires_at = None, None
                return
            run = s.get(Run, job.run_id)
            run.status, run.finished_at = state, utcnow()
            if error is not None:
                run.error = error

    def get_job(self, job_id: int) -> Job:
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found")
            return job

    def get_job_for_run(self, run_id: int) -> Job:
        """The run's latest job."""
        with self.session() as s:
            job = s.scalars(select(Job).where(Job.run_id == run_id).order_by(Job.id.desc()).limit(1)).first()
            if job is None:
                raise NotFound(f"run {run_id} has no job")
            return job

    def heartbeat_ages(self) -> list[tuple[int, str | None, float]]:
        """(job id, worker, seconds since its heartbeat) for running jobs."""
        now = utcnow()
        with self.session() as s:
            rows = s.execute(select(Job.id, Job.worker_id, Job.heartbeat_at).where(Job.state == "running")).all()
        out = []
        for job_id, worker, beat in rows:
            if beat is not None and beat.tzinfo is None:  # SQLite returns naive UTC
                beat = beat.replace(tzinfo=now.tzinfo)
            out.append((job_id, worker, (now - beat).total_seconds() if beat else float("nan")))
        return out

    def jobs_by_state(self) -> dict[str, int]:
        with self.session() as s:
            return dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
