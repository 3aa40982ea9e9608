"""``ivon-diag worker``: claim jobs from the store, run them with a heartbeat, release them on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path

from sqlalchemy.exc import OperationalError

from app.store import DatabaseUnavailable, Store, StoreError, WriteRefused
from worker import distributed as D
from worker.checkpoints import Checkpoints, reap_deleted
from worker.config import ConfigError, parse_config
from worker.hooks import HookDispatcher
from worker.influence import answer_next
from worker.resilient import ResilientStore
from worker.trainer import JobFailed, Trainer


def run_job(store: Store, run_id: int, checkpoint_dir: str | Path, stop_event: threading.Event | None = None,
            log=print, callbacks=None, progress: bool = False) -> str:
    """Run one run's job in this process; returns the final state ("done", "failed", "cancelled", "queued")."""
    stop_event = stop_event or threading.Event()
    run = store.get_run(run_id)
    hooks = HookDispatcher([(h.url, h.events, h.secret) for h in store.hooks_for(run_id)], callbacks)
    state = None
    try:
        cfg = parse_config(run.config)
        trainer = Trainer(cfg, store, run_id, checkpoint_dir, run.uid,
                          should_stop=lambda: stop_event.is_set() or store.get_run(run_id).stop_requested, log=log,
                          hooks=hooks, progress=progress)
        outcome = trainer.run()
        state = "done"
        if outcome == "released":
            state = "cancelled" if store.get_run(run_id).stop_requested else "queued"
    except WriteRefused:  # the database's fault, not the run's: nothing to mark failed (and no way to)
        raise
    except (ConfigError, JobFailed) as err:
        state = _fail(store, run_id, str(err), log, hooks)
    except Exception as err:  # a user factory or data that raises: the worker goes on with other jobs
        log(traceback.format_exc())
        state = _fail(store, run_id, f"{type(err).__name__}: {err}", log, hooks)
    finally:
        hooks.close()
        if state in ("done", "failed", "cancelled"):  # ended: nothing will resume it
            Checkpoints(checkpoint_dir, run.uid).finish()
    return state


def _fail(store: Store, run_id: int, reason: str, log, hooks: HookDispatcher) -> str:
    log(f"run {run_id} failed: {reason}")
    store.set_run_status(run_id, "failed", error=reason)
    hooks.emit("failed", {"run_id": run_id, "error": reason})
    return "failed"


def serve(store: Store, checkpoint_dir: str | Path, worker_id: str | None = None, lease_seconds: float = 60.0,
          once: bool = False, poll_seconds: float = 1.0, log=print, progress: bool = False,
          max_crashes: int = 3) -> None:
    """Claim and run jobs until SIGTERM/SIGINT (or, with ``once``, until the queue is empty).

    Under torchrun, rank 0 claims the jobs and tells the other ranks which run to train with it."""
    if D.rank() != 0:
        return _follow(checkpoint_dir)
    try:
        _serve(store, checkpoint_dir, worker_id, lease_seconds, once, poll_seconds, log, progress, max_crashes)
    finally:
        D.broadcast({"exit": True})


def _follow(checkpoint_dir: str | Path) -> None:
    """A rank other than 0: train the runs rank 0 names, write nothing; rank 0 handles signals and outcomes."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    while not (msg := D.broadcast(None)).get("exit"):
        if "run_id" in msg:
            try:
                Trainer(parse_config(msg["config"]), None, msg["run_id"], checkpoint_dir, msg["uid"],
                        log=lambda *a, **k: None).run()
            except Exception:  # rank 0 met the same fault and stored it
                pass


def _serve(store: Store, checkpoint_dir, worker_id, lease_seconds, once, poll_seconds, log, progress,
           max_crashes) -> None:
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    stop = threading.Event()
    store = ResilientStore(store, log=log)

    def on_signal(signum, _frame):
        log(f"worker {worker_id}: signal {signum}, checkpointing and releasing the job")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    devices, waiting, reaped = D.claimable_devices(), {}, 0
    while not stop.is_set():
        try:
            job = store.claim_job(worker_id, lease_seconds, devices=devices, max_crashes=max_crashes)
            if job is None and (now := store.waiting_devices(devices)) != waiting:
                waiting = now
                for device, n in now.items():  # said once, not at every poll
                    log(f"worker {worker_id}: {n} queued job(s) ask for device {device!r}, which this worker "
                        f"cannot place (it takes {', '.join(devices)}); they wait for a worker that can")
        except (OperationalError, DatabaseUnavailable, WriteRefused) as err:  # down or read-only: keep serving
            log(f"worker {worker_id}: cannot claim jobs: {str(err).splitlines()[0][:200]}")
            if once and isinstance(err, WriteRefused):
                raise
            D.broadcast({"idle": True})
            stop.wait(poll_seconds * 5)
            continue
        if job is None:
            try:  # between jobs: an influence query, if one waits (rank 0 alone: the other ranks idle)
                answered = answer_next(store, checkpoint_dir, worker_id, log)
            except (OperationalError, DatabaseUnavailable, WriteRefused) as err:
                log(f"worker {worker_id}: cannot answer influence queries: {str(err).splitlines()[0][:200]}")
                answered = False
            if answered:
                D.broadcast({"idle": True})
                continue
            try:  # idle: the checkpoint folders of runs deleted elsewhere (the API) go too
                reaped = reap_deleted(store, checkpoint_dir, reaped, log)
            except (OperationalError, DatabaseUnavailable) as err:
                log(f"worker {worker_id}: cannot read deleted runs: {str(err).splitlines()[0][:200]}")
            if once:
                return
            D.broadcast({"idle": True})
            stop.wait(poll_seconds)
            continue
        log(f"worker {worker_id}: job {job.id} (run {job.run_id}, attempt {job.attempts})")
        if D.active():  # the other ranks train it too (the extra read only under torchrun)
            run = store.get_run(job.run_id)
            D.broadcast({"run_id": run.id, "uid": run.uid, "config": run.config})
        beating = threading.Event()

        def heartbeat(job_id=job.id, beating=beating):
            while not beating.wait(lease_seconds / 3):
                try:
                    kept = store.heartbeat(job_id, worker_id, lease_seconds)
                except (StoreError, OperationalError) as err:  # the run's next write will meet the same fault
                    log(f"worker {worker_id}: heartbeat of job {job_id} failed: {str(err).splitlines()[0][:200]}")
                    continue
                if not kept:
                    log(f"worker {worker_id}: lost the lease of job {job_id}")
                    stop.set()

        hb = threading.Thread(target=heartbeat, daemon=True)
        hb.start()
        try:
            state = run_job(store, job.run_id, checkpoint_dir, stop, log, progress=progress)
        except WriteRefused as err:
            log(f"worker {worker_id}: run {job.run_id} interrupted: {err}. Its job goes back to the queue and "
                "resumes from its last checkpoint once the database accepts writes")
            state = None
        finally:
            beating.set()
            hb.join()
        if state is None:
            try:
                store.finish_job(job.id, "queued")
            except (StoreError, OperationalError):  # still refused: the lease expires instead
                pass
            if once:
                raise WriteRefused(f"run {job.run_id} interrupted: the database refuses writes")
            stop.wait(poll_seconds * 5)
            continue
        store.finish_job(job.id, state, error=store.get_run(job.run_id).error if state == "failed" else None)
        if state == "queued":
            return
        time.sleep(0)
