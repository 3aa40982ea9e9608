"""A tracker for users' own training loops: a few lines log evaluations to the store, so the dashboard works
without the worker.

    tracker = Tracker("sqlite:///ivon-diag.db", "my-run", config={"lr": 0.5})
    tracker.log_examples(labels=y_train.tolist())
    ...
    res = compute_sensitivities(model, (x_train, y_train), ivon_variance(optimizer, model))
    tracker.log_evaluation(step, res, metrics={"test_nll": 0.31}, optimizer=optimizer)
    tracker.finish()

The LOO's level calibrated on your held-out data (worker.calibration; docs/calibration.md): create the tracker with
``calibration="frozen_variance"`` (or "refit", "frozen") and ``total_steps``, then pass each evaluation's held-out NLL:
``log_evaluation(step, res, optimizer=optimizer, heldout_nll=val_nll, heldout_examples=len(x_val))``.
    _, suspects = tracker.store.examples_at(tracker.run_id, k=20, by="loo_mean")  # likely mislabeled

Test examples and influence, for the dashboard's test pages: ``log_test_examples(labels)``, then
``log_evaluation(..., test_probs=softmax(model(x_test)))`` and
``log_influence(influence(model, x_test[ids], (x_train, y_train), variance), ids, y_test[ids], y_train)``.
"""

from __future__ import annotations

import math

import numpy as np

from app.store import Store, ensure_current, make_engine, upgrade
from app.store.job_config import CalibrationConfig
from sensitivity import SensitivityResult, ivon_variance
from sensitivity.deviations import CAPPED_FORMS
from worker.calibration import Calibration, variance_level


class Tracker:
    def __init__(self, db: str | None, name: str, config: dict | None = None, migrate: bool = True,
                 run_id: int | None = None, calibration: str | None = None, total_steps: int | None = None,
                 freeze_at: float = 0.2):
        """A new run named ``name``, or with ``run_id`` the existing run, continued (a resumed training).

        ``calibration``: "refit", "frozen" or "frozen_variance" to read the LOO at the scale on σ² that matches the
        held-out NLL each ``log_evaluation`` is given (the frozen modes fit over the evaluations up to ``freeze_at``
        × ``total_steps``, then freeze; a continued run refits)."""
        if calibration is not None:
            if total_steps is None and calibration != "refit":
                raise ValueError(f"calibration {calibration!r} needs total_steps (it freezes after freeze_at of them)")
            cfg = CalibrationConfig(source="test", mode=calibration, freeze_at=freeze_at)
            config = {**(config or {}), "calibration": cfg.model_dump(mode="json")}
            self.calibration = Calibration(cfg, np.empty(0, np.int64), total_steps or 1, seed=0)
        else:
            self.calibration = None
        engine = make_engine(db)
        if migrate:
            upgrade(engine)
        ensure_current(engine)
        self.store = Store(engine)
        self.run = self.store.create_run(name, config or {}, enqueue=False) if run_id is None else \
            self.store.get_run(run_id)
        self.store.set_run_status(self.run.id, "running")

    @property
    def run_id(self) -> int:
        return self.run.id

    def log_examples(self, labels=None, flipped=None, thumbnails=None, indices=None, sources=None,
                     class_names=None) -> None:
        """The training examples: labels, PNG thumbnails, ``sources`` (where each comes from in your data: a file
        name, a row) and ``class_names`` (label k's name), shown on the dashboard and kept in the exports."""
        n = len(labels if labels is not None else indices)
        self.store.add_examples(self.run.id, indices if indices is not None else list(range(n)), labels, flipped,
                                thumbnails=thumbnails, sources=sources, class_names=class_names)

    def log_evaluation(self, step: int, result: SensitivityResult, metrics: dict[str, float] | None = None,
                       epoch: float | None = None, optimizer=None, test_probs=None, heldout_nll: float | None = None,
                       heldout_examples: int | None = None, variance=None) -> None:
        """Write the LOO estimate, train NLL and accuracy from ``result``, ``metrics``, and the per-example rows.

        As the worker does, it records the share of examples whose correction hit its cap (``loo_capped``, for a
        form with one) and, given an IVON ``optimizer``, how much of its curvature is still hess_init's
        (``hess_init_share``: near 1 the LOO's scale is hess_init's; the run page warns). With ``calibration`` at
        creation, ``heldout_nll`` (the NLL of held-out examples at the same weights) calibrates the LOO's level;
        ``variance`` (default: the IVON ``optimizer``'s σ²) sets the level frozen_variance holds. Calibrated,
        ``form="first_order"`` in the pass costs one first-order pass instead of the default Rayleigh form's two,
        and the scale sets the level alike (what the worker does: docs/calibration.md)."""
        if not math.isfinite(result.loo):
            raise ValueError(f"the LOO estimate at step {step} is not finite ({result.loo})")
        own = {}
        if self.calibration is not None:
            if heldout_nll is None or not math.isfinite(heldout_nll):
                raise ValueError(f"heldout_nll at step {step}: the tracker calibrates, so each evaluation needs the "
                                 f"held-out NLL as a finite number (got {heldout_nll!r})")
            if variance is None and hasattr(optimizer, "hess_init_share"):
                variance = ivon_variance(optimizer)
            result, own = self.calibration.update(result, lambda v: float(v.double().mean()), float(heldout_nll),
                                                  step, variance_level(variance))
            own["calibration_nll"] = float(heldout_nll)
            if heldout_examples is not None:
                own["calibration_examples"] = float(heldout_examples)
        own["train_nll"] = float(result.losses.double().mean())
        if result.form in CAPPED_FORMS:
            own["loo_capped"] = result.capped
        if result.logits.shape[1] > 1 and result.targets.ndim == 1:
            own["train_acc"] = float((result.logits.argmax(1) == result.targets).double().mean())
        if hasattr(optimizer, "hess_init_share"):
            own["hess_init_share"] = optimizer.hess_init_share()
        self.store.write_evaluation(
            self.run.id, step, loo=result.loo, metrics={**own, **(metrics or {})}, idx=result.indices.numpy(),
            scores=result.scores.numpy(), loo_losses=result.loo_losses.numpy(),
            prob_label=None if result.loo_probs is None else result.loo_probs.numpy(), epoch=epoch,
            class_probs=None if result.loo_probs is None else result.loo_class_probs().numpy())
        if test_probs is not None:  # (test examples, classes), in the order log_test_examples gave them
            self.store.write_test_predictions(self.run.id, step, test_probs)

    def log_test_examples(self, labels, thumbnails=None) -> None:
        """The test examples (0..n−1) whose predictions ``log_evaluation(test_probs=...)`` records."""
        self.store.add_test_examples(self.run.id, list(labels), thumbnails)

    def log_influence(self, result, test_indices, test_labels, train_labels, flipped=None, k: int = 10) -> None:
        """Store a ``sensitivity.influence`` result for the dashboard's test example pages (queries in the order of
        ``test_indices``; ``train_labels`` by training index)."""
        from worker.influence import influence_rows

        rows = influence_rows(result, test_indices, test_labels, train_labels, flipped, k)
        self.store.record_influence(self.run.id, {"test": [int(i) for i in test_indices], "k": k,
                                                  "predicted": False}, rows)

    def finish(self, status: str = "done", error: str | None = None) -> None:
        self.store.set_run_status(self.run.id, status, error=error)
