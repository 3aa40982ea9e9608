"""A run's test examples: labels and thumbnails once, then at each evaluation the prediction, its probability and
the loss at the label (the latest evaluation's kept): what the dashboard lists worst first and explains with
influence queries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.store.engine import NotFound
from app.store.models import INSERT_BATCH, Run, TestExample, finite


class TestExamples:
    """Mixed into ``Store``, whose ``session`` it uses."""

    def session(self, write: bool = False) -> Session:
        raise NotImplementedError

    def add_test_examples(self, run_id: int, labels: Sequence[int],
                          thumbnails: Sequence[bytes | None] | None = None) -> None:
        """The run's test examples 0..n−1 (replacing any)."""
        labels = list(labels)
        with self.session(write=True) as s, s.begin():
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            s.execute(delete(TestExample).where(TestExample.run_id == run_id))
            for lo in range(0, len(labels), INSERT_BATCH):  # thumbnails may be made as read (worker.data.Thumbnails)
                s.execute(TestExample.__table__.insert(), [
                    {"run_id": run_id, "idx": i, "label": int(labels[i]),
                     "thumbnail": None if thumbnails is None else thumbnails[i]}
                    for i in range(lo, min(lo + INSERT_BATCH, len(labels)))])

    def write_test_predictions(self, run_id: int, step: int, probs: np.ndarray) -> None:
        """Each test example's prediction at ``step`` from its class probabilities (rows in index order); an older
        step than the one stored is ignored."""
        probs = np.asarray(probs, dtype=np.float64)
        with self.session(write=True) as s, s.begin():
            latest = s.scalar(select(func.max(TestExample.step)).where(TestExample.run_id == run_id))
            if latest is not None and step < latest:
                return
            labels = dict(s.execute(select(TestExample.idx, TestExample.label)
                                    .where(TestExample.run_id == run_id)).all())
            if len(labels) != len(probs):
                raise ValueError(f"run {run_id} has {len(labels)} test examples, the predictions {len(probs)}")
            pred = probs.argmax(1)
            rows = []
            for i in range(len(probs)):
                label = labels.get(i)
                loss = None if label is None else finite(-np.log(max(probs[i, label], 1e-300)))
                rows.append({"run_id": run_id, "idx": i, "step": step, "predicted": int(pred[i]),
                             "prob": finite(probs[i, pred[i]]), "loss": loss})
            if rows:
                s.execute(update(TestExample), rows)  # one bulk UPDATE by primary key

    def test_examples(self, run_id: int, limit: int = 100, offset: int = 0,
                      worst_first: bool = True) -> tuple[int, list[TestExample]]:
        """(total, a page of test examples), by loss (the highest first, or the lowest), unevaluated ones last."""
        limit = max(0, min(int(limit), 1000))
        order = TestExample.loss.desc() if worst_first else TestExample.loss.asc()
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            total = s.scalar(select(func.count()).select_from(TestExample).where(TestExample.run_id == run_id))
            q = (select(TestExample).where(TestExample.run_id == run_id)
                 .order_by(TestExample.loss.is_(None), order, TestExample.idx).limit(limit).offset(max(0, offset)))
            return int(total or 0), list(s.scalars(q))

    def test_example(self, run_id: int, idx: int) -> TestExample:
        with self.session() as s:
            ex = s.get(TestExample, (run_id, idx))
            if ex is None:
                raise NotFound(f"run {run_id} has no test example {idx}")
            return ex
