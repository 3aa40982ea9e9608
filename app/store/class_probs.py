"""Each training example's LOO class probabilities at a run's latest evaluation: what cleanlab takes as
``pred_probs`` (``GET /api/v1/runs/{id}/pred_probs.csv``, ``ivon-diag export RUN --pred-probs``). Only the latest
evaluation's are kept: N × K numbers per evaluation would outgrow every other table."""

from __future__ import annotations

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.store.engine import CorruptData, NotFound
from app.store.models import ClassProbs, Example, Run

CLASS_CHUNK = 4096  # examples per row
MAX_CLASSES = 1000


def _dtype(classes: int) -> np.dtype:
    return np.dtype([("idx", "<i8"), ("p", "<f4", (classes,))])


def write_class_probs(s: Session, run_id: int, step: int, idx: np.ndarray, probs: np.ndarray) -> None:
    """Replace the run's class probabilities by this evaluation's (unless a later evaluation's are stored)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(idx) or not 1 < probs.shape[1] <= MAX_CLASSES:
        raise ValueError(f"class probabilities must be (examples, classes) with 2 to {MAX_CLASSES} classes and one "
                         f"row per example; got {probs.shape} for {len(idx)} examples")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("class probabilities must be finite and >= 0")
    later = s.scalar(select(func.max(ClassProbs.step)).where(ClassProbs.run_id == run_id))
    if later is not None and later > step:
        return
    s.execute(delete(ClassProbs).where(ClassProbs.run_id == run_id))
    order = np.argsort(np.asarray(idx), kind="stable")
    rec = np.zeros(len(order), dtype=_dtype(probs.shape[1]))
    rec["idx"], rec["p"] = np.asarray(idx)[order], probs[order]
    rows = [{"run_id": run_id, "chunk": c, "step": step, "classes": probs.shape[1],
             "data": rec[lo : lo + CLASS_CHUNK].tobytes()} for c, lo in enumerate(range(0, len(rec), CLASS_CHUNK))]
    if rows:
        s.execute(ClassProbs.__table__.insert(), rows)


class ClassProbabilities:
    """Mixed into ``Store``, whose ``session`` it uses."""

    def session(self, write: bool = False) -> Session:
        raise NotImplementedError

    def class_probs(self, run_id: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(step, idx, labels, probs): the latest stored LOO class probabilities, by example index, rows summing
        to 1; labels -1 where the example has none. NotFound when the run has none."""
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            rows = list(s.execute(select(ClassProbs.step, ClassProbs.classes, ClassProbs.data)
                                  .where(ClassProbs.run_id == run_id).order_by(ClassProbs.chunk)))
            if not rows:
                raise NotFound(f"run {run_id} has no class probabilities (a classification run stores them at each "
                               "evaluation)")
            step, classes = rows[0][0], rows[0][1]
            dtype = _dtype(classes)
            if any(len(r[2]) % dtype.itemsize for r in rows):
                raise CorruptData(f"class probabilities of run {run_id} are corrupt")
            rec = np.concatenate([np.frombuffer(r[2], dtype=dtype) for r in rows])
            labels = dict(s.execute(select(Example.idx, Example.label).where(Example.run_id == run_id)).all())
        probs = rec["p"].astype(np.float64)
        probs /= np.maximum(probs.sum(1, keepdims=True), 1e-300)
        lab = np.array([-1 if labels.get(int(i)) is None else labels[int(i)] for i in rec["idx"]], dtype=np.int64)
        return step, rec["idx"].copy(), lab, probs

    def class_probs_table(self, run_id: int) -> tuple[int, dict[str, list]]:
        """(step, columns idx, label, p_0 … p_{K−1}) for an export."""
        step, idx, labels, probs = self.class_probs(run_id)
        cols: dict[str, list] = {"idx": idx.tolist(), "label": [None if v < 0 else int(v) for v in labels]}
        for k in range(probs.shape[1]):
            cols[f"p_{k}"] = probs[:, k].tolist()
        return step, cols
