"""The store: every statement the app and the worker need, as typed functions (the only code that speaks SQL).

Non-finite numbers: one rule everywhere. NaN and ±inf are stored as NULL in scalar columns and come back as None
from per-example arrays (SQL has no NaN on every backend and JSON cannot carry it); examples with a non-finite score
rank after every finite score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.store.access import HooksAndTokens
from app.store.class_probs import write_class_probs
from app.store.early_stop import EarlyStopStates
from app.store.engine import Conflict, CorruptData, NotFound, make_engine
from app.store.example_detail import ExampleDetails
from app.store.example_scores import ExampleScores, chunk_records, resolve_step
from app.store.influence import InfluenceQueries
from app.store.models import (
    INSERT_BATCH,
    MAX_FEATURES,
    DeletedRun,
    Evaluation,
    Example,
    Job,
    Metric,
    Run,
    ScoreChunk,
    finite,
    utcnow,
)
from app.store.queue import JobQueue, job_device
from app.store.records import build, running_mean
from app.store.records import chunks as chunks_of
from app.store.reviews import Reviews
from app.store.rollups import refresh_rollups
from app.store.run_fields import RunManagement, run_filters
from app.store.series import MetricSeries
from app.store.test_examples import TestExamples

log = logging.getLogger("ivon_diag.store")


class Store(ExampleScores, JobQueue, HooksAndTokens, MetricSeries, ExampleDetails, InfluenceQueries, TestExamples,
            Reviews, RunManagement, EarlyStopStates):
    """Runs and evaluations; per-example results (``ExampleScores``); curves (``MetricSeries``); the job queue
    (``JobQueue``); hooks and API tokens (``HooksAndTokens``); LOO class probabilities and one example's detail
    (``ExampleDetails``); influence queries (``InfluenceQueries``); test examples' predictions (``TestExamples``);
    label review (``Reviews``); names, tags and notes (``RunManagement``); early stopping's state
    (``EarlyStopStates``)."""

    def __init__(self, engine: Engine | str | None = None):
        self.engine = engine if isinstance(engine, Engine) else make_engine(engine)
        self.dialect = self.engine.dialect.name
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self, write: bool = False) -> Session:
        if write and self.dialect == "sqlite":
            return Session(self.engine.execution_options(immediate=True), expire_on_commit=False)
        return self._session()

    # ------------------------------------------------------------------------------------------ runs
    def create_run(self, name: str, config: dict | None = None, n_examples: int | None = None,
                   enqueue: bool = True) -> Run:
        with self.session(write=True) as s, s.begin():
            run = Run(name=name, config=config or {}, n_examples=n_examples, status="queued")
            s.add(run)
            s.flush()
            if enqueue:
                s.add(Job(run_id=run.id, device=job_device(config)))
        return run

    def get_run(self, run_id: int) -> Run:
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise NotFound(f"run {run_id} not found")
            return run

    def list_runs(self, status: str | None = None, limit: int = 100, offset: int = 0, tag: str | None = None,
                  name: str | None = None) -> list[Run]:
        """Newest first; ``tag``: runs carrying it; ``name``: runs whose name contains it (any case)."""
        q = select(Run).order_by(Run.id.desc()).limit(min(limit, 1000)).offset(offset)
        for cond in run_filters(status, tag, name):
            q = q.where(cond)
        with self.session() as s:
            return list(s.scalars(q))

    def set_run_status(self, run_id: int, status: str, error: str | None = None) -> None:
        values: dict[str, Any] = {"status": status}
        if status == "running":
            values["started_at"] = utcnow()
        if status in ("done", "failed", "cancelled"):
            values["finished_at"] = utcnow()
        if error is not None:
            values["error"] = error
        self._update_run(run_id, values)

    def request_stop(self, run_id: int) -> None:
        """Ask the worker to stop; a queued run is cancelled at once."""
        with self.session(write=True) as s, s.begin():
            run = s.get(Run, run_id)
            if run is None:
                raise NotFound(f"run {run_id} not found")
            run.stop_requested = True
            if run.status == "queued":
                run.status, run.finished_at = "cancelled", utcnow()
                s.execute(update(Job).where(Job.run_id == run_id, Job.state == "queued").values(state="cancelled"))

    def _update_run(self, run_id: int, values: dict) -> None:
        with self.session(write=True) as s, s.begin():
            if s.execute(update(Run).where(Run.id == run_id).values(**values)).rowcount == 0:
                raise NotFound(f"run {run_id} not found")

    # -------------------------------------------------------------------------------- examples/evals
    def count_evaluations(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(Evaluation)) or 0

    def add_examples(self, run_id: int, idx: Sequence[int], labels: Sequence[int] | None = None,
                     flipped: Sequence[bool] | None = None, original: Sequence[int] | None = None,
                     thumbnails: Sequence[bytes | None] | None = None, sources: Sequence[str] | None = None,
                     class_names: Sequence[str] | None = None, features=None,
                     feature_names: Sequence[str] | None = None) -> None:
        """The run's training examples (replacing any): labels, injected flips, thumbnails, and where each comes
        from in the data (``sources``: a CSV line, an image path); ``class_names``: label k's name; ``features``:
        tabular rows as read (N × d finite numbers, d ≤ MAX_FEATURES) named by ``feature_names``."""
        n = len(idx)
        if class_names is not None and (len(class_names) > 100_000 or any(len(str(c)) > 1000 for c in class_names)):
            raise ValueError("class names: at most 100,000, each at most 1,000 characters")
        if features is not None:
            features = np.asarray(features)
            if features.dtype == np.float32:  # each float32 as its shortest decimal (14.13, not 14.130000114440918)
                features = features.astype(str)
            features = features.astype(np.float64)
            if features.ndim != 2 or len(features) != n or not 0 < features.shape[1] <= MAX_FEATURES:
                raise ValueError(f"features: one row of 1 to {MAX_FEATURES} numbers per example, got shape "
                                 f"{features.shape} for {n} examples")
            if not np.isfinite(features).all():
                raise ValueError("features: non-finite values")
            names = list(feature_names or [])
            if len(names) != features.shape[1] or any(len(str(c)) > 200 for c in names):
                raise ValueError(f"feature_names: {features.shape[1]} names of at most 200 characters expected")
            features = features.tolist()

        def rows(lo: int, hi: int) -> list[dict]:
            return [{"run_id": run_id, "idx": int(idx[i]), "label": None if labels is None else int(labels[i]),
                     "flipped": None if flipped is None else bool(flipped[i]),
                     "original_label": None if original is None else int(original[i]),
                     "thumbnail": None if thumbnails is None else thumbnails[i],
                     "source": None if sources is None else str(sources[i])[:1000],
                     "features": None if features is None else features[i]} for i in range(lo, hi)]

        with self.session(write=True) as s, s.begin():
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            s.execute(delete(Example).where(Example.run_id == run_id))
            for lo in range(0, n, INSERT_BATCH):  # thumbnails may be made as read (worker.data.Thumbnails)
                s.execute(Example.__table__.insert(), rows(lo, min(lo + INSERT_BATCH, n)))
            s.execute(update(Run).where(Run.id == run_id).values(
                n_examples=n, class_names=None if class_names is None else [str(c) for c in class_names],
                feature_names=None if features is None else [str(c) for c in feature_names]))

    def write_evaluation(self, run_id: int, step: int, *, loo: float | None, metrics: dict[str, float],
                         idx: np.ndarray | None = None, scores: np.ndarray | None = None,
                         loo_losses: np.ndarray | None = None, prob_label: np.ndarray | None = None,
                         epoch: float | None = None, wall_time: float | None = None,
                         class_probs: np.ndarray | None = None, carry: bool = False,
                         scores_scale: bool = False, screened: np.ndarray | None = None) -> Evaluation:
        """Write one evaluation, its metric points and its per-example rows in one transaction.

        Writing (run, step) again replaces it (a worker resumed after a crash re-evaluates its last step). Each
        example's running mean LOO loss folds this evaluation into the run's last one before ``step``; a step written
        out of order does not update the means of evaluations after it. ``class_probs`` (examples × classes, rows
        in ``idx`` order) replaces the run's stored LOO class probabilities (``ClassProbabilities``). ``carry``: the
        evaluation scored a slice of the examples; the others keep their last records (``records``, layout 3).
        ``scores_scale``: the scores are proportional to the metric ``calibration_scale`` (the first-order form's):
        carried scores are brought to this evaluation's scale, so rankings compare every example at one scale.
        ``screened``: per example of ``idx``, whether its row comes from screening (``sensitivity.screen``).
        """
        clean = {k: finite(v) for k, v in metrics.items()}
        n = 0 if idx is None else len(idx)
        with self.session(write=True) as s, s.begin():
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            factor = _scale_since(s, run_id, step, clean.get("calibration_scale")) if carry and scores_scale else 1.0
            recs = build(idx, scores, loo_losses, prob_label, _previous_records(s, run_id, step), step,
                         carry, factor, screened) if n else None
            chunks = chunks_of(run_id, step, recs) if n else []
            n = 0 if recs is None else len(recs)
            s.execute(delete(Evaluation).where(Evaluation.run_id == run_id, Evaluation.step == step))
            s.execute(delete(ScoreChunk).where(ScoreChunk.run_id == run_id, ScoreChunk.step == step))
            s.execute(delete(Metric).where(Metric.run_id == run_id, Metric.step == step,
                                           Metric.name.in_(list(clean) + ["loo"])))
            ev = Evaluation(run_id=run_id, step=step, epoch=finite(epoch), loo=finite(loo), metrics=clean,
                            n_examples=n, wall_time=finite(wall_time))
            s.add(ev)
            points = [{"run_id": run_id, "name": k, "step": step, "value": v} for k, v in clean.items()]
            points.append({"run_id": run_id, "name": "loo", "step": step, "value": finite(loo)})
            s.execute(Metric.__table__.insert(), points)
            refresh_rollups(s, run_id, {p["name"]: [step] for p in points})
            if chunks:
                s.execute(ScoreChunk.__table__.insert(), chunks)
            if class_probs is not None and n:
                write_class_probs(s, run_id, step, idx, class_probs)
        return ev

    def evaluations(self, run_id: int, since_step: int | None = None, limit: int = 1000) -> list[Evaluation]:
        self.get_run(run_id)
        q = select(Evaluation).where(Evaluation.run_id == run_id).order_by(Evaluation.step).limit(min(limit, 10000))
        if since_step is not None:
            q = q.where(Evaluation.step > since_step)
        with self.session() as s:
            return list(s.scalars(q))

    def resolve_step(self, run_id: int, step: int | None = None) -> int:
        """``step``, or the run's latest evaluated one; NotFound for an unknown run or one not evaluated yet."""
        with self.session() as s:
            return resolve_step(s, run_id, step)

    def delete_run(self, run_id: int) -> None:
        """The run and everything stored for it (its job, evaluations, curves, examples, scores, hooks), its uid kept
        for the workers to remove its checkpoint folder; refused with Conflict while a worker trains it."""
        with self.session(write=True) as s, s.begin():
            run = s.get(Run, run_id)
            if run is None:
                raise NotFound(f"run {run_id} not found")
            if run.status == "running":
                raise Conflict(f"run {run_id} is running: stop it first (POST /api/v1/runs/{run_id}/stop)")
            if run.uid:  # its checkpoint folder goes with it: the workers read this (reap_deleted)
                s.add(DeletedRun(uid=run.uid))
            s.delete(run)

    def latest_step(self, run_id: int) -> int | None:
        with self.session() as s:
            return s.scalar(select(func.max(Evaluation.step)).where(Evaluation.run_id == run_id))


def _scale_since(s: Session, run_id: int, step: int, scale: float | None) -> float:
    """``scale`` over the calibration scale of the run's last evaluation before ``step`` (1 where either is
    missing): what carried scores, read at that scale, are multiplied by."""
    before = s.scalar(select(Evaluation.metrics).where(Evaluation.run_id == run_id, Evaluation.step < step)
                      .order_by(Evaluation.step.desc()).limit(1))
    old = (before or {}).get("calibration_scale")
    if not (scale and old and math.isfinite(scale) and math.isfinite(old) and scale > 0 and old > 0):
        return 1.0
    return scale / old


def _previous_records(s: Session, run_id: int, step: int) -> np.ndarray | None:
    """The records (by idx) of the run's last evaluation before ``step`` that has per-example rows, with their
    running means; rebuilt from every earlier evaluation where those were written before layout 2."""
    earlier = (ScoreChunk.run_id == run_id, ScoreChunk.kind == "idx", ScoreChunk.step < step)
    prev = s.scalar(select(func.max(ScoreChunk.step)).where(*earlier))
    if prev is None:
        return None
    try:
        recs = _fold_earlier(s, run_id, prev, earlier)
        recs["scored"] = np.where(recs["scored"] >= 0, recs["scored"], prev)
        return recs
    except CorruptData as err:  # this evaluation is not lost for it: the means restart (loo_loss_evals says so)
        log.warning("run %s: running means restart at step %s: %s", run_id, step, err)
        return None


def _fold_earlier(s: Session, run_id: int, prev: int, earlier: tuple) -> np.ndarray:
    layouts: list[int] = []
    recs = chunk_records(s, run_id, prev, "idx", layouts=layouts)
    if min(layouts) >= 2:  # layout 2 on carries the means
        return recs
    acc = None
    for st in list(s.scalars(select(ScoreChunk.step).where(*earlier).distinct().order_by(ScoreChunk.step))):
        recs = chunk_records(s, run_id, st, "idx")
        recs["loo_mean"], recs["evals"] = running_mean(recs["idx"], recs["loo"], acc)
        acc = recs
    return acc
