"""Influence queries on a finished run: which training examples pushed its predictions on chosen test examples,
from the run's final weights and posterior variance (saved with its model), its data loaded as the job loaded it.

    rows = query_run(store, run_id, [0, 7], checkpoint_dir)   # or: ivon-diag influence RUN --test 0 7

Queries submitted through the API (``POST /api/v1/runs/{id}/influence``) are answered by workers: ``answer_next``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from app.store import Store
from sensitivity import InfluenceResult, influence
from sensitivity.calibration import scale_covariance
from worker.calibration import Calibration
from worker.checkpoints import MODEL, evaluation_path, kept_steps, run_folder
from worker.config import parse_config
from worker.covariances import job_variance, optimizer_variance
from worker.data import Rows, inject_label_noise, load_dataset
from worker.hooks import HookDispatcher
from worker.trainer import build_model

MAX_QUERIES = 100


def query_run(store: Store, run_id: int, test_indices: Sequence[int], checkpoint_dir: str | Path, k: int = 10,
              predicted: bool = False, step: int | None = None) -> list[dict]:
    """For each test example: its label, prediction and loss, and the k training examples whose removal would raise
    (proponents) or lower (opponents) that loss most, with their labels and predicted loss changes. The loss is at
    the test label, or at the predicted one with ``predicted``. From the final model, or with ``step`` from that
    evaluation's kept state (the job's ``sensitivity.keep_states`` newest)."""
    if not test_indices or len(test_indices) > MAX_QUERIES:
        raise ValueError(f"give 1 to {MAX_QUERIES} test examples, not {len(test_indices)}")
    if not 1 <= k <= 1000:
        raise ValueError(f"Invalid k: {k!r} (must be 1 to 1000)")
    run = store.get_run(run_id)
    folder = run_folder(checkpoint_dir, run.uid)
    path = folder / MODEL if step is None else evaluation_path(folder, step)
    if step is not None and not path.exists():
        kept = kept_steps(folder)
        raise FileNotFoundError(f"run {run_id} kept no state at step {step} (kept: "
                                f"{', '.join(map(str, kept)) if kept else 'none'}; the job config's "
                                "sensitivity.keep_states sets how many of the newest evaluations are kept)")
    if not path.exists():
        raise FileNotFoundError(f"run {run_id} has no final model at {path}: it has not finished, or its checkpoints "
                                "live under another --checkpoint-dir")
    final = torch.load(path, weights_only=True, map_location="cpu")
    cfg = parse_config(run.config)
    data = inject_label_noise(load_dataset(cfg.data, cfg.seed), cfg.label_noise)
    bad = [i for i in test_indices if not 0 <= int(i) < len(data.xte)]
    if bad:
        raise ValueError(f"test examples {bad} are outside the run's test set (0 to {len(data.xte) - 1})")
    model = build_model(cfg, data)
    model.load_state_dict(final["model"])
    # the examples the run trained on (its calibration split held out), as the trainer chose them
    trained = torch.from_numpy(Calibration(cfg.calibration, data.ytr.numpy(), 0, cfg.seed + 4).trained(data.n))
    if "variance" in final:
        opt_var = final["variance"]
    elif cfg.optimizer.name == "sgd":
        opt_var = optimizer_variance(cfg, model, None, data, trained)
    else:
        raise ValueError(f"run {run_id}'s final model was saved without its posterior variance (a run finished by an "
                         "earlier version): train it again to query its influence")
    ids = torch.as_tensor([int(i) for i in test_indices])
    scale = final.get("calibration_scale", 1.0)  # the LOO's calibrated scale on σ², the same for influence
    var = scale_covariance(model, job_variance(cfg, model, data, opt_var, trained), scale)
    res = influence(model, data.xte[ids], Rows(data.xtr, data.ytr, trained, cfg.sensitivity.chunk_size), var,
                    targets=None if predicted else data.yte[ids], form=cfg.sensitivity.form,
                    chunk_size=cfg.sensitivity.chunk_size, max_amplification=cfg.sensitivity.max_amplification,
                    outputs=False)  # the rows keep loss changes only: K times less work than every output's
    rows = influence_rows(res, ids.tolist(), data.yte[ids].tolist(), data.ytr.tolist(), data.flipped.tolist(), k)
    return [{**r, "step": int(final["step"])} for r in rows]


def influence_rows(res: InfluenceResult, test_indices: Sequence[int], test_labels: Sequence[int],
                   train_labels: Sequence[int], flipped: Sequence[bool] | None = None, k: int = 10) -> list[dict]:
    """The stored form of an influence result: per query its test index, label, prediction, loss and k proponents
    and opponents (training index, label, flipped, loss change)."""
    losses = torch.nn.functional.cross_entropy(res.query_logits, res.query_targets.long(), reduction="none")

    def rows(found, changes):
        return [{"idx": int(i), "label": int(train_labels[i]), "flipped": bool(flipped[i]) if flipped else False,
                 "loss_change": float(c)} for i, c in zip(found, changes)]

    return [{"test_idx": int(i), "label": int(label), "predicted": int(res.query_logits[q].argmax()),
             "target": int(res.query_targets[q]), "loss": float(losses[q]),
             "proponents": rows(*res.proponents(q, k)), "opponents": rows(*res.opponents(q, k))}
            for q, (i, label) in enumerate(zip(test_indices, test_labels))]


def answer_next(store: Store, checkpoint_dir: str | Path, worker_id: str, log=print) -> bool:
    """Claim the oldest pending influence query and answer it (rows, or the reason it cannot be); the run's webhooks
    get an ``influence`` event. False when none waits."""
    query = store.claim_influence(worker_id)
    if query is None:
        return False
    req = query.request
    rows, error = None, None
    try:
        status = store.get_run(query.run_id).status
        if status != "done" and req.get("step") is None:  # a kept evaluation's state outlives a failed run
            raise ValueError(f"run {query.run_id} ended {status}: it has no final model to query (an evaluation's "
                             "kept state can be: give its step)")
        rows = query_run(store, query.run_id, req["test"], checkpoint_dir, k=req["k"], predicted=req["predicted"],
                         step=req.get("step"))
    except (ValueError, FileNotFoundError) as err:  # the query's or the run's fault, said as it is
        error = str(err)
    except Exception as err:  # the worker goes on with other work
        error = f"{type(err).__name__}: {err}"
    store.finish_influence(query.id, result=rows, error=error)
    log(f"worker {worker_id}: influence query {query.id} on run {query.run_id} "
        + ("answered" if error is None else f"failed: {error}"))
    hooks = HookDispatcher([(h.url, h.events, h.secret) for h in store.hooks_for(query.run_id)])
    try:
        hooks.emit("influence", {"run_id": query.run_id, "query_id": query.id,
                                 "status": "failed" if error else "done", "error": error})
    finally:
        hooks.close()
    return True
