"""Each training example's LOO class probabilities averaged over a run's evaluations: what cleanlab takes as
``pred_probs`` (``GET /api/v1/runs/{id}/pred_probs.csv``, ``ivon-diag export RUN --pred-probs``). The average ranks
flipped labels after training has memorized them, where the last evaluation's probabilities no longer do
(docs/label-issues.md). Two generations are kept, not every evaluation's N × K numbers: the mean up to the latest
evaluation and up to the one before, which a re-evaluated latest step (a resumed worker) folds into again."""

from __future__ import annotations

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.store.engine import CorruptData, NotFound
from app.store.models import ClassProbs, Example, Run

CLASS_CHUNK = 4096  # examples per row
MAX_CLASSES = 1000


def _dtype(classes: int) -> np.dtype:
    return np.dtype([("idx", "<i8"), ("evals", "<i4"), ("p", "<f4", (classes,))])


def _read(s: Session, run_id: int, gen: int) -> tuple[int | None, np.ndarray | None]:
    rows = list(s.execute(select(ClassProbs.step, ClassProbs.classes, ClassProbs.data)
                          .where(ClassProbs.run_id == run_id, ClassProbs.gen == gen).order_by(ClassProbs.chunk)))
    if not rows:
        return None, None
    dtype = _dtype(rows[0][1])
    if any(len(r[2]) % dtype.itemsize or r[1] != rows[0][1] for r in rows):
        raise CorruptData(f"class probabilities of run {run_id} are corrupt")
    return rows[0][0], np.concatenate([np.frombuffer(r[2], dtype=dtype) for r in rows])


def _fold(prev: np.ndarray | None, idx: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Records by idx: ``prev``'s running means with this evaluation's ``probs`` folded in (examples it did not
    include keep theirs)."""
    classes = probs.shape[1]
    if prev is not None and prev.dtype != _dtype(classes):
        raise ValueError(f"this evaluation has {classes} classes, the run's earlier ones {prev.dtype['p'].shape[0]}")
    ids = np.union1d(idx, [] if prev is None else prev["idx"]).astype(np.int64)
    out = np.zeros(len(ids), dtype=_dtype(classes))
    out["idx"] = ids
    total = np.zeros((len(ids), classes))
    if prev is not None:
        at = np.searchsorted(ids, prev["idx"])
        out["evals"][at] = prev["evals"]
        total[at] = prev["p"].astype(np.float64) * prev["evals"][:, None]
    at = np.searchsorted(ids, idx)
    out["evals"][at] += 1
    total[at] += probs
    out["p"] = total / np.maximum(out["evals"], 1)[:, None]
    return out


def write_class_probs(s: Session, run_id: int, step: int, idx: np.ndarray, probs: np.ndarray) -> None:
    """Fold one evaluation's class probabilities (rows in ``idx`` order) into the run's averages."""
    idx = np.asarray(idx, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(idx) or not 1 < probs.shape[1] <= MAX_CLASSES:
        raise ValueError(f"class probabilities must be (examples, classes) with 2 to {MAX_CLASSES} classes and one "
                         f"row per example; got {probs.shape} for {len(idx)} examples")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("class probabilities must be finite and >= 0")
    latest, current = _read(s, run_id, 0)
    if latest is not None and step < latest:
        return  # an older evaluation written late: the averages have moved past it
    if latest is not None and step == latest:  # re-evaluated: fold into the generation before it again
        base = _read(s, run_id, 1)[1]
        s.execute(delete(ClassProbs).where(ClassProbs.run_id == run_id, ClassProbs.gen == 0))
    else:
        base = current
        s.execute(delete(ClassProbs).where(ClassProbs.run_id == run_id, ClassProbs.gen == 1))
        s.execute(update(ClassProbs).where(ClassProbs.run_id == run_id).values(gen=1))
    rec = _fold(base, idx, probs)
    rows = [{"run_id": run_id, "gen": 0, "chunk": c, "step": step, "classes": probs.shape[1],
             "data": rec[lo : lo + CLASS_CHUNK].tobytes()} for c, lo in enumerate(range(0, len(rec), CLASS_CHUNK))]
    s.execute(ClassProbs.__table__.insert(), rows)


class ClassProbabilities:
    """Mixed into ``Store``, whose ``session`` it uses."""

    def session(self, write: bool = False) -> Session:
        raise NotImplementedError

    def class_probs(self, run_id: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(step, idx, labels, probs, evals): each example's class probabilities averaged over the evaluations up to
        ``step`` (the latest), rows summing to 1, by index; labels −1 where the example has none; evals: how many
        evaluations each average holds. NotFound when the run has none."""
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            step, rec = _read(s, run_id, 0)
            if rec is None:
                raise NotFound(f"run {run_id} has no class probabilities (a classification run stores them at each "
                               "evaluation)")
            labels = dict(s.execute(select(Example.idx, Example.label).where(Example.run_id == run_id)).all())
        probs = rec["p"].astype(np.float64)
        probs /= np.maximum(probs.sum(1, keepdims=True), 1e-300)
        lab = np.array([-1 if labels.get(int(i)) is None else labels[int(i)] for i in rec["idx"]], dtype=np.int64)
        return step, rec["idx"].copy(), lab, probs, rec["evals"].astype(np.int64)

    def class_probs_table(self, run_id: int) -> tuple[int, dict[str, list]]:
        """(step, columns idx, label, evals, p_0 … p_{K−1}) for an export."""
        step, idx, labels, probs, evals = self.class_probs(run_id)
        cols: dict[str, list] = {"idx": idx.tolist(), "label": [None if v < 0 else int(v) for v in labels],
                                 "evals": evals.tolist()}
        for k in range(probs.shape[1]):
            cols[f"p_{k}"] = probs[:, k].tolist()
        return step, cols
