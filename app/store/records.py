"""Per-example records of an evaluation: the numpy layouts of ``score_chunks.data``, their chunking, and each
example's running mean LOO loss over the run's evaluations.

Layout 1 (revision 0001): idx, rank, score, loo, prob. Layout 2 adds ``loo_mean`` (the mean of the example's finite
LOO losses over this and every earlier evaluation that included it) and ``evals`` (how many). The mean ranks
flipped labels after training has memorized them, where the final loss no longer does (docs/validation.md §4).
Layout 3 adds ``scored``: the step whose scoring the record's score, loss and probability come from. An evaluation
that scored a slice of the examples (``worker.cadence``'s rotation) carries every other example's last record, so
each evaluation is a whole snapshot: rankings cover every example, and ``scored`` says how fresh each one is.
Layout 4 adds ``screened``: 1 where the record comes from screening (the output layer's share of the sensitivities,
``sensitivity.screen``, mapped onto the exact pass's scale), 0 from the exact pass.
"""

from __future__ import annotations

import numpy as np

from app.store.engine import CorruptData

CHUNK = 2048  # ranks per "rank" chunk
IDX_CHUNK = 256  # example indices per "idx" bucket

_V1 = [("idx", "<i8"), ("rank", "<i4"), ("score", "<f4"), ("loo", "<f4"), ("prob", "<f4")]
_V2 = _V1 + [("loo_mean", "<f4"), ("evals", "<i4")]
_V3 = _V2 + [("scored", "<i4")]
LAYOUTS = {1: np.dtype(_V1), 2: np.dtype(_V2), 3: np.dtype(_V3), 4: np.dtype(_V3 + [("screened", "u1")])}
LAYOUT = 4  # what this code writes
UNKNOWN = -1  # ``scored`` of records written before layout 3: the evaluation's own step
RECORD = LAYOUTS[LAYOUT]


def decode(data: bytes, layout: int) -> np.ndarray:
    """One chunk's records in the current layout (an older layout's missing fields: NaN mean, 0 evaluations,
    ``scored`` UNKNOWN, not screened)."""
    dtype = LAYOUTS.get(layout)
    if dtype is None:
        raise CorruptData(f"per-example records of layout {layout} are unknown to this code (newer? upgrade ivon-diag)")
    if len(data) % dtype.itemsize:
        raise CorruptData(f"per-example records are corrupt: {len(data)} bytes is not a whole number of "
                          f"{dtype.itemsize}-byte layout-{layout} records")
    recs = np.frombuffer(data, dtype=dtype)
    if layout == LAYOUT:
        return recs
    out = np.zeros(len(recs), dtype=RECORD)
    for name in dtype.names:
        out[name] = recs[name]
    if layout < 2:
        out["loo_mean"] = np.nan
    if layout < 3:
        out["scored"] = UNKNOWN
    return out


def running_mean(idx: np.ndarray, loo: np.ndarray, prev: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, evals) of each example's finite LOO losses: this evaluation's ``loo`` folded into ``prev``, the
    records of the previous evaluation sorted by idx (None: the run's first). Non-finite losses are skipped."""
    loo = np.asarray(loo, dtype=np.float64)
    ok = np.isfinite(loo)
    evals = ok.astype(np.int64)
    total = np.where(ok, loo, 0.0)
    if prev is not None and len(prev):
        pos = np.minimum(np.searchsorted(prev["idx"], idx), len(prev) - 1)
        seen = (prev["idx"][pos] == idx) & (prev["evals"][pos] > 0)
        n_prev = prev["evals"][pos][seen].astype(np.int64)
        total[seen] += prev["loo_mean"][pos][seen].astype(np.float64) * n_prev
        evals[seen] += n_prev
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(evals > 0, total / np.maximum(evals, 1), np.nan)
    return mean, evals


def build(idx, scores, loo_losses, prob_label, prev: np.ndarray | None, step: int = UNKNOWN,
          carry: bool = False, carry_factor: float = 1.0, screened=None) -> np.ndarray:
    """The records of one evaluation (unranked), validated. ``carry``: the evaluation scored a slice; every example
    of ``prev`` it did not score keeps its last record (``scored`` says from when), its score times
    ``carry_factor``. ``screened``: per example, whether its record comes from screening (None: none does)."""
    n = len(idx)
    rec = np.zeros(n, dtype=RECORD)
    rec["idx"] = np.asarray(idx, dtype=np.int64)
    if len(np.unique(rec["idx"])) != n:
        raise ValueError("example indices of an evaluation must be unique")
    if n and int(rec["idx"].min()) < 0:
        raise ValueError("example indices must be >= 0")
    rec["score"] = np.asarray(scores, dtype=np.float64)
    loo = np.full(n, np.nan) if loo_losses is None else np.asarray(loo_losses, dtype=np.float64)
    rec["loo"] = loo
    rec["prob"] = np.nan if prob_label is None else np.asarray(prob_label, dtype=np.float64)
    rec["loo_mean"], rec["evals"] = running_mean(rec["idx"], loo, prev)
    rec["scored"] = step
    if screened is not None:
        if len(screened) != n:
            raise ValueError(f"screened has {len(screened)} entries for {n} examples")
        rec["screened"] = np.asarray(screened, dtype=bool)
    if carry and prev is not None and len(prev):
        rec = np.concatenate([rec, prev[~np.isin(prev["idx"], rec["idx"])]])
        rec["score"][n:] *= carry_factor
    return rec


def chunks(run_id: int, step: int, rec: np.ndarray) -> list[dict]:
    """Rows of ``score_chunks`` for one evaluation: the records by rank (of the score), the CHUNK first and last by
    the running mean (kind "mean", chunks 0 and 1), and by example index."""
    n = len(rec)
    sc = rec["score"].astype(np.float64)
    by_rank = np.argsort(np.where(np.isfinite(sc), -sc, np.inf), kind="stable")
    rec["rank"][by_rank] = np.arange(n, dtype=np.int32)
    out = []
    ranked = rec[by_rank]
    for c, start in enumerate(range(0, n, CHUNK)):
        part = ranked[start : start + CHUNK]
        out.append({"run_id": run_id, "step": step, "kind": "rank", "chunk": c, "lo": start,
                    "hi": start + len(part) - 1, "layout": LAYOUT, "data": part.tobytes()})
    ends = ((0, _first_by_mean(rec, CHUNK)), (max(n - CHUNK, 0), _first_by_mean(rec, CHUNK, last=True)))
    for c, (start, part) in enumerate(ends[: 1 if n <= CHUNK else 2]):  # top-k / bottom-k read one of them
        out.append({"run_id": run_id, "step": step, "kind": "mean", "chunk": c, "lo": start,
                    "hi": start + len(part) - 1, "layout": LAYOUT, "data": part.tobytes()})
    by_idx = rec[np.argsort(rec["idx"], kind="stable")]
    buckets = by_idx["idx"] // IDX_CHUNK
    cuts = np.flatnonzero(np.diff(buckets)) + 1
    for part in np.split(by_idx, cuts):
        out.append({"run_id": run_id, "step": step, "kind": "idx", "chunk": int(part["idx"][0] // IDX_CHUNK),
                    "lo": int(part["idx"][0]), "hi": int(part["idx"][-1]), "layout": LAYOUT, "data": part.tobytes()})
    return out


def _mean_key(recs: np.ndarray) -> np.ndarray:
    m = recs["loo_mean"].astype(np.float64)
    return np.where(np.isfinite(m), -m, np.inf)


def order_by_mean(recs: np.ndarray) -> np.ndarray:
    """Records sorted by descending mean LOO loss (examples without one last), ties by index."""
    return recs[np.lexsort((recs["idx"], _mean_key(recs)))]


def _first_by_mean(recs: np.ndarray, k: int, last: bool = False) -> np.ndarray:
    """``order_by_mean(recs)[:k]`` (or ``[-k:]``) in O(N): a partition, then a sort of the candidates (with every
    record tied at the boundary, so that ties break by index exactly as in the full sort)."""
    if len(recs) <= k:
        return order_by_mean(recs)
    key = _mean_key(recs)
    bound = np.partition(key, len(key) - k if last else k - 1)[len(key) - k if last else k - 1]
    cand = order_by_mean(recs[key >= bound if last else key <= bound])
    return cand[-k:] if last else cand[:k]
