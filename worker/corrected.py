"""The corrected data set of a reviewed run, with the decisions applied (dropped examples left out, relabeled ones
with their new label) and everything else as the source has it, in a form a job reads back:

- an npz (any source but a factory): the training split as the job loaded it (same seed: same split; features as
  read, before standardization) and the test split, plus ``idx`` (each kept example's index in the run);
- a CSV (a run on a CSV): the file itself, row for row, the training rows decided on changed (by their line), the
  labels written as the file writes them (class names stay names).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from app.store import Store
from worker import access
from worker.config import parse_config
from worker.data import load_dataset


def write_corrected(store: Store, run_id: int, out: str | Path) -> dict[str, int]:
    """Write the corrected data set to ``out`` (``.csv`` or ``.npz``); returns the counts of kept, relabeled and
    dropped training examples."""
    run = store.get_run(run_id)
    cfg = parse_config(run.config)
    if cfg.data.name == "factory":
        raise ValueError(f"run {run_id} reads a factory's data: correct it at its source (the decisions: "
                         f"ivon-diag export {run_id} --reviews)")
    reviews = store.reviews(run_id)
    counts = {"relabeled": sum(r.decision == "relabel" for r in reviews),
              "dropped": sum(r.decision == "drop" for r in reviews)}
    if str(out).endswith(".csv"):
        if cfg.data.name != "csv":
            raise ValueError(f"run {run_id} reads {cfg.data.name!r} data: a corrected CSV needs a run on a CSV; write "
                             "an .npz instead")
        kept = _write_csv(store, run_id, cfg, reviews, out, run.class_names)
        return {"kept": kept, **counts}
    data = load_dataset(cfg.data.model_copy(update={"standardize": False}), cfg.seed)  # features as read
    if run.n_examples is not None and len(data.ytr) != run.n_examples:
        raise ValueError(f"run {run_id}'s data no longer matches it ({len(data.ytr)} training examples read, "
                         f"{run.n_examples} stored): was the file changed?")
    keep, labels = store.corrected_labels(run_id)
    keep = np.asarray(keep, dtype=np.int64)
    x = data.xtr.numpy()[keep]
    np.savez(out, x_train=x.reshape(len(keep), *data.image_shape) if data.image_shape else x,
             y_train=np.asarray(labels, dtype=np.int64), x_test=data.xte.numpy(), y_test=data.yte.numpy(), idx=keep)
    return {"kept": len(keep), **counts}


def _write_csv(store: Store, run_id: int, cfg, reviews, out, names: list[str] | None) -> int:
    """The run's CSV with the decisions applied by line; returns how many training rows stay."""
    path = access.confined(cfg.data.path, "data.path")
    by_line = {}
    for r in reviews:
        if not (r.source or "").startswith("line "):
            raise ValueError(f"example {r.idx} of run {run_id} has no CSV line (trained before lines were kept): "
                             "train the run again to write a corrected CSV")
        by_line[int(r.source.split()[1])] = r
    reader = csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"), newline=""))
    rows = [(reader.line_num, row) for row in reader if row]
    header = rows[0][1]
    j = header.index(cfg.data.label_column)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    dropped = 0
    for line, row in rows[1:]:
        r = by_line.get(line)
        if r is not None and r.decision == "drop":
            dropped += 1
            continue
        if r is not None and r.decision == "relabel":
            row = list(row)
            row[j] = names[r.label] if names and r.label < len(names) else str(r.label)
        writer.writerow(row)
    Path(out).write_text(buf.getvalue(), encoding="utf-8")
    return (store.get_run(run_id).n_examples or 0) - dropped
