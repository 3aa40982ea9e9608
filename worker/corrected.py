"""The corrected data set of a reviewed run: its training split as the job loaded it (same seed: same split, before
standardization), relabeled and dropped examples applied, its test split unchanged, as an npz that a job reads back
(``data: {name: npz, path: ...}``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.store import Store
from worker.config import parse_config
from worker.data import load_dataset


def write_corrected(store: Store, run_id: int, out: str | Path) -> dict[str, int]:
    """Write the corrected npz (x_train, y_train, x_test, y_test, and ``idx``: each kept example's index in the
    run); returns counts of kept, relabeled and dropped examples."""
    run = store.get_run(run_id)
    cfg = parse_config(run.config)
    if cfg.data.name == "factory":
        raise ValueError(f"run {run_id} reads a factory's data: correct it at its source (the decisions: "
                         f"ivon-diag export {run_id} --reviews)")
    data = load_dataset(cfg.data.model_copy(update={"standardize": False}), cfg.seed)  # raw features, as read
    keep, labels = store.corrected_labels(run_id)
    if run.n_examples is not None and len(data.ytr) != run.n_examples:
        raise ValueError(f"run {run_id}'s data no longer matches it ({len(data.ytr)} training examples read, "
                         f"{run.n_examples} stored): was the file changed?")
    reviews = store.reviews(run_id)
    keep = np.asarray(keep, dtype=np.int64)
    x = data.xtr.numpy()[keep]
    np.savez(out, x_train=x.reshape(len(keep), *data.image_shape) if data.image_shape else x,
             y_train=np.asarray(labels, dtype=np.int64), x_test=data.xte.numpy(), y_test=data.yte.numpy(), idx=keep)
    return {"kept": len(keep), "relabeled": sum(r.decision == "relabel" for r in reviews),
            "dropped": sum(r.decision == "drop" for r in reviews)}
