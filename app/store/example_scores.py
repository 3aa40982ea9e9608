"""Reading an evaluation's per-example results: pages by rank or by running mean, the whole table, the score
histogram, one example's history (the layouts: ``app.store.records``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.store.engine import NotFound
from app.store.models import Evaluation, Example, Run, ScoreChunk, finite
from app.store.records import CHUNK, IDX_CHUNK, LAYOUT, RECORD, UNKNOWN, decode, order_by_mean


@dataclass
class ScoreRow:
    rank: int
    idx: int
    score: float | None
    loo_loss: float | None
    prob_label: float | None
    label: int | None = None
    flipped: bool | None = None
    step: int | None = None
    loo_loss_mean: float | None = None
    loo_loss_evals: int = 0
    scored_step: int | None = None  # the step whose scoring this row's score and loss come from
    source: str | None = None  # where the example comes from in the data
    screened: bool = False  # the row's score and loss come from screening (the output layer's share, mapped)


class ExampleScores:
    """Store mixin: the per-example readers (``self.session`` from the Store)."""

    def examples_at(self, run_id: int, step: int | None = None, k: int = 50, offset: int = 0,
                    least: bool = False, by: str = "score") -> tuple[int, list[ScoreRow]]:
        """The k most (or least) sensitive examples at ``step`` (default: the latest), with labels and flags.

        ``by="loo_mean"``: ordered by the mean LOO loss over the evaluations up to ``step`` instead (one chunk for
        the CHUNK first or last; deeper pages sort the whole evaluation, O(N)); examples without one come last."""
        if by not in ("score", "loo_mean"):
            raise ValueError(f"examples are ordered by 'score' or 'loo_mean', not {by!r}")
        k = max(0, min(int(k), 1000))
        with self.session() as s:
            step = resolve_step(s, run_id, step)
            n = s.scalar(select(Evaluation.n_examples).where(Evaluation.run_id == run_id, Evaluation.step == step))
            if n is None:
                raise NotFound(f"run {run_id} has no evaluation at step {step}")
            first, last = (n - offset - k, n - offset - 1) if least else (offset, offset + k - 1)
            first, last = max(first, 0), min(last, n - 1)
            if k == 0 or last < first:
                return step, []
            if by == "score":
                recs = chunk_records(s, run_id, step, "rank", first // CHUNK, last // CHUNK)
                base = (first // CHUNK) * CHUNK
            else:
                recs, base = _mean_window(s, run_id, step, n, first, last)
            recs = recs[first - base : last - base + 1]
            if least:
                recs = recs[::-1]
            labels = {i: rest for i, *rest in s.execute(select(*_LABEL_COLUMNS).where(
                Example.run_id == run_id, Example.idx.in_(recs["idx"].tolist())))}
            rows = [_row(r, step, *labels.get(int(r["idx"]), (None, None, None))) for r in recs]
            return step, rows

    def evaluation_size(self, run_id: int, step: int) -> int:
        """How many examples the evaluation at ``step`` holds (0 when there is none)."""
        with self.session() as s:
            return s.scalar(select(Evaluation.n_examples).where(Evaluation.run_id == run_id,
                                                                Evaluation.step == step)) or 0

    def examples_table(self, run_id: int, step: int) -> dict[str, list]:
        """Every example of one evaluation, by rank: idx, rank, score, loo_loss, prob_label, loo_loss_mean,
        loo_loss_evals, label, flipped."""
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            recs = chunk_records(s, run_id, step, "rank")
            if not len(recs):
                raise NotFound(f"run {run_id} has no per-example scores at step {step}")
            labels = {i: rest for i, *rest in s.execute(select(*_LABEL_COLUMNS).where(Example.run_id == run_id))}

        def clean(a):
            return [None if not math.isfinite(v) else v for v in a.astype(np.float64).tolist()]

        idx = recs["idx"].tolist()
        return {"idx": idx, "rank": recs["rank"].tolist(), "score": clean(recs["score"]),
                "loo_loss": clean(recs["loo"]), "prob_label": clean(recs["prob"]),
                "loo_loss_mean": clean(recs["loo_mean"]), "loo_loss_evals": recs["evals"].tolist(),
                "scored_step": np.where(recs["scored"] >= 0, recs["scored"], step).tolist(),
                "screened": recs["screened"].astype(bool).tolist(),
                "label": [labels.get(i, (None, None, None))[0] for i in idx],
                "flipped": [labels.get(i, (None, None, None))[1] for i in idx],
                "source": [labels.get(i, (None, None, None))[2] for i in idx]}

    def score_histogram(self, run_id: int, step: int | None = None, bins: int = 30) -> tuple[int, list, list]:
        """(step, counts, edges) of the finite sensitivity scores at ``step`` (default: the latest)."""
        with self.session() as s:
            step = resolve_step(s, run_id, step)
            scores = chunk_records(s, run_id, step, "rank")["score"].astype(np.float64)
        if not len(scores):
            raise NotFound(f"run {run_id} has no per-example scores at step {step}")
        counts, edges = np.histogram(scores[np.isfinite(scores)], bins=bins)
        return step, counts.tolist(), edges.tolist()

    def example_history(self, run_id: int, idx: int) -> list[ScoreRow]:
        """One example's results at every evaluation, by step."""
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            q = (select(ScoreChunk.step, ScoreChunk.layout, ScoreChunk.data)
                 .where(ScoreChunk.run_id == run_id, ScoreChunk.kind == "idx", ScoreChunk.chunk == idx // IDX_CHUNK)
                 .order_by(ScoreChunk.step))
            ex = s.execute(select(*_LABEL_COLUMNS).where(Example.run_id == run_id, Example.idx == idx)).first()
            label, flipped, source = (None, None, None) if ex is None else tuple(ex)[1:]
            got = s.execute(q).all()
            # one array over every evaluation's bucket (a long run's history is hundreds of buckets)
            if all(layout == LAYOUT for _, layout, _ in got):
                recs = decode(b"".join(data for *_, data in got), LAYOUT)
                sizes = [len(data) // RECORD.itemsize for *_, data in got]
            else:
                parts = [decode(data, layout) for _, layout, data in got]
                recs, sizes = (np.concatenate(parts) if parts else np.zeros(0, RECORD)), [len(p) for p in parts]
            steps = np.repeat(np.array([step for step, *_ in got], dtype=np.int64), sizes)
            hit = (recs["idx"] == idx) & ((recs["scored"] == steps) | (recs["scored"] == UNKNOWN))
            cols = {name: recs[hit][name].tolist() for name in ("rank", "score", "loo", "prob", "loo_mean", "evals",
                                                                  "scored", "screened")}
            rows = [ScoreRow(rank, idx, finite(sc), finite(lo), finite(pr), label, flipped, st, finite(mean), evals,
                             st if scored < 0 else scored, source, bool(scr))
                    for rank, sc, lo, pr, mean, evals, scored, scr, st in zip(*cols.values(), steps[hit].tolist())]
            if not rows and ex is None:
                raise NotFound(f"example {idx} of run {run_id} not found")
            return rows


def resolve_step(s: Session, run_id: int, step: int | None) -> int:
    """``step``, or the run's latest evaluated step; NotFound for an unknown run or a run not yet evaluated."""
    if s.get(Run, run_id) is None:
        raise NotFound(f"run {run_id} not found")
    if step is None:
        step = s.scalar(select(func.max(Evaluation.step)).where(Evaluation.run_id == run_id))
        if step is None:
            raise NotFound(f"run {run_id} has no evaluation yet")
    return step


# what a score row carries of its example (not its thumbnail or feature row: blobs a listing does not need)
_LABEL_COLUMNS = (Example.idx, Example.label, Example.flipped, Example.source)


def _row(r, step: int, label=None, flipped=None, source=None) -> ScoreRow:
    scored = int(r["scored"])
    return ScoreRow(int(r["rank"]), int(r["idx"]), finite(r["score"]), finite(r["loo"]), finite(r["prob"]),
                    label, flipped, step, finite(r["loo_mean"]), int(r["evals"]), step if scored < 0 else scored,
                    source, bool(r["screened"]))


def chunk_records(s: Session, run_id: int, step: int, kind: str, lo: int = 0, hi: int | None = None,
                   layouts: list | None = None) -> np.ndarray:
    """The records of one evaluation's chunks of ``kind`` numbered lo..hi (default: all), in chunk order; the
    layouts they were written in are appended to ``layouts`` when given."""
    q = select(ScoreChunk.layout, ScoreChunk.data).where(ScoreChunk.run_id == run_id, ScoreChunk.step == step,
                                                         ScoreChunk.kind == kind, ScoreChunk.chunk >= lo)
    if hi is not None:
        q = q.where(ScoreChunk.chunk <= hi)
    parts = []
    for layout, data in s.execute(q.order_by(ScoreChunk.chunk)):
        parts.append(decode(data, layout))
        if layouts is not None:
            layouts.append(layout)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=RECORD)  # a writable copy


def _mean_window(s: Session, run_id: int, step: int, n: int, first: int, last: int) -> tuple[np.ndarray, int]:
    """(records, rank of the first) covering ranks first..last by the running mean: one "mean" chunk where the
    window lies in the CHUNK first or last; else the whole evaluation sorted (deep pages, records before layout 2)."""
    for chunk, lo in ((0, 0), (1, max(n - CHUNK, 0))):
        if lo <= first and last < lo + CHUNK:
            recs = chunk_records(s, run_id, step, "mean", chunk, chunk)
            if len(recs):
                return recs, lo
    return order_by_mean(chunk_records(s, run_id, step, "idx")), 0
