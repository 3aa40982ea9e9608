"""SQLAlchemy 2.0 typed models (shared/DESIGN.md §4). Per-example scores are rows keyed by their rank at each
evaluation, so top-k and bottom-k are index range scans; a second index serves one example's history."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUN_STATES = ("queued", "running", "done", "failed", "cancelled")
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


def finite(x: Any) -> float | None:
    """The non-finite rule: NaN and ±inf become None (NULL)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def utcnow() -> datetime:
    return datetime.now(UTC)


MAX_FEATURES = 64  # tabular columns an example keeps as read (its page shows the row)
INSERT_BATCH = 2048  # examples per insert: a run's examples (and thumbnails made as read) are never all in memory

class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # unique across databases: checkpoints are bound to it, not to the id (ids restart with a new database)
    uid: Mapped[str | None] = mapped_column(String(32), unique=True, index=True, default=lambda: uuid.uuid4().hex)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    stop_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    n_examples: Mapped[int | None] = mapped_column(Integer)
    class_names: Mapped[list | None] = mapped_column(JSON)  # label k's name, where the data names classes
    feature_names: Mapped[list | None] = mapped_column(JSON)  # tabular inputs' column names
    tags: Mapped[list | None] = mapped_column(JSON)
    notes: Mapped[str | None] = mapped_column(Text)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    # the run config's device: a worker claims only jobs it can place (a GPU job waits for a GPU worker)
    device: Mapped[str] = mapped_column(String(16), default="auto", server_default="auto")
    worker_id: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # leases that expired on it
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    loo: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)  # train/test NLL, accuracy, ECE, Brier, h stats
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    wall_time: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("run_id", "step", name="uq_evaluations_run_step"),)


class Metric(Base):
    """One point of a named series (train_nll, test_nll, loo, accuracy, …)."""

    __tablename__ = "metrics"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float | None] = mapped_column(Float)


class MetricRollup(Base):
    """Min and max (with their steps) of a series over step buckets of width ``level``: long curves are
    downsampled from these rows instead of scanning every point."""

    __tablename__ = "metric_rollups"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    min_step: Mapped[int | None] = mapped_column(Integer)
    min_value: Mapped[float | None] = mapped_column(Float)
    max_step: Mapped[int | None] = mapped_column(Integer)
    max_value: Mapped[float | None] = mapped_column(Float)


class Example(Base):
    __tablename__ = "examples"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[int | None] = mapped_column(Integer)
    flipped: Mapped[bool | None] = mapped_column(Boolean)
    original_label: Mapped[int | None] = mapped_column(Integer)
    thumbnail: Mapped[bytes | None] = mapped_column(LargeBinary)  # PNG
    source: Mapped[str | None] = mapped_column(String(1000))  # CSV line, image path, row of the source's arrays
    features: Mapped[list | None] = mapped_column(JSON)  # a tabular row as read (names: the run's feature_names)


class Review(Base):
    """A decision on one training example: keep it, relabel it to ``label``, or drop it."""

    __tablename__ = "reviews"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    decision: Mapped[str] = mapped_column(String(8))
    label: Mapped[int | None] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ScoreChunk(Base):
    """Per-example results of one evaluation, stored column-wise in chunks of CHUNK examples.

    Each evaluation is written twice: ordered by rank (``kind`` "rank", chunks of 2048 ranks: top-k and bottom-k
    read one chunk) and bucketed by example index (``kind`` "idx", chunk = idx // 256: one example's history reads
    one small chunk per evaluation), plus the CHUNK first and last by the running mean LOO loss (``kind`` "mean").
    ``data`` is a numpy record array of ``layout`` (see app.store.records).
    """

    __tablename__ = "score_chunks"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(4), primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True)
    lo: Mapped[int] = mapped_column(Integer)
    hi: Mapped[int] = mapped_column(Integer)
    layout: Mapped[int] = mapped_column(SmallInteger, server_default="1")  # app.store.records.LAYOUTS
    data: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (Index("ix_score_chunks_history", "run_id", "kind", "chunk", "step"),)


class ClassProbs(Base):
    """Each example's LOO class probabilities averaged over the run's evaluations (cleanlab's ``pred_probs``):
    generation 0 up to the latest evaluation ``step``, 1 up to the one before (what a re-evaluated latest step
    folds into); chunks of examples by index, ``data`` records of app.store.class_probs."""

    __tablename__ = "class_probs"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    gen: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(Integer)
    classes: Mapped[int] = mapped_column(SmallInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class EarlyStopState(Base):
    __tablename__ = "early_stopping"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    monitor: Mapped[str] = mapped_column(String(100))
    mode: Mapped[str] = mapped_column(String(8))
    best: Mapped[float | None] = mapped_column(Float)
    best_step: Mapped[int | None] = mapped_column(Integer)
    wait: Mapped[int] = mapped_column(Integer, default=0)
    stopped_step: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)


class Hook(Base):
    __tablename__ = "hooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list] = mapped_column(JSON, default=list)
    secret: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class InfluenceQuery(Base):
    """An influence query on a finished run (app.store.influence): pending, running (leased by a worker), done
    (``result``: one row per test example, worker.influence.query_run's) or failed (``error``)."""

    __tablename__ = "influence_queries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    request: Mapped[dict] = mapped_column(JSON)
    result: Mapped[list | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TestExample(Base):
    """A run's test example: its label and thumbnail, and at the latest evaluation its predicted class, that class's
    probability and the loss at its label (app.store.test_examples)."""

    __tablename__ = "test_examples"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[int | None] = mapped_column(Integer)
    thumbnail: Mapped[bytes | None] = mapped_column(LargeBinary)  # PNG
    step: Mapped[int | None] = mapped_column(Integer)
    predicted: Mapped[int | None] = mapped_column(Integer)
    prob: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class DeletedRun(Base):
    """A deleted run's uid, so that workers remove its checkpoint folder from their disks (the API may not see it)."""

    __tablename__ = "deleted_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uid: Mapped[str] = mapped_column(String(32))
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
