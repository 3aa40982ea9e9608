"""The LOO estimate's level, calibrated against held-out data during a job (the job config's ``calibration``).

IVON's σ² takes its scale mostly from hess_init, and the LOO's level follows it (docs/validation.md); the paper
picks hess_init on a grid against held-out data. Here a scale α on σ² is fitted instead, for the diagnostics only
(training is unchanged), so that the LOO estimate matches the NLL of held-out examples: a stratified split of the
training set kept out of training (default), or the job's test split. ``mode``:
  refit            α refitted at every evaluation: the LOO's mean is the held-out NLL's, the per-example values
                   are at that level
  frozen           α fitted at the evaluations in the first ``freeze_at`` of the run, then fixed
  frozen_variance  frozen, and the level of ασ² (its geometric mean) held as σ² grows by schedule (hess_init's
                   remainder decays under the matched β2): after the freeze the LOO is a prediction
Every evaluation still fits the α that would match now (``calibration_fit``): its ratio to the scale in use is the
drift since the freeze. How each mode holds against held-out truth: docs/calibration.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from app.store.job_config import CalibrationConfig
from sensitivity import SensitivityResult
from sensitivity.calibration import fit_scale, rescale
from worker.sampling import stratified_permutation


def variance_level(variance) -> float | None:
    """Geometric mean of the positive σ² entries of a per-parameter variance (a mapping or sequence of tensors);
    None for other covariances (K-FAC, dense), whose level the frozen_variance mode then does not follow."""
    if isinstance(variance, dict):
        tensors = list(variance.values())
    elif isinstance(variance, (list, tuple)):
        tensors = list(variance)
    else:
        return None
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        return None
    total, count = 0.0, 0
    for t in tensors:
        pos = t.detach()[t.detach() > 0]
        total += float(pos.double().log().sum())
        count += pos.numel()
    return math.exp(total / count) if count else None


def heldout_nll(model: nn.Module, x: Tensor, y: Tensor, ids: Tensor, chunk: int = 256) -> tuple[float, float]:
    """(NLL, its standard error) at the model's current weights on rows ``ids`` of (x, y), gathered a chunk at a
    time (a memory-mapped data set is never copied whole)."""
    model.eval()
    with torch.no_grad():
        losses = torch.cat([nn.functional.cross_entropy(model(x[c.to(x.device)]), y[c.to(y.device)],
                                                        reduction="none").double().cpu() for c in ids.split(chunk)])
    se = float(losses.std() / math.sqrt(len(losses))) if len(losses) > 1 else float("nan")
    return float(losses.mean()), se


class Calibration:
    """Which training examples are held out, and the scale each evaluation reads the LOO at."""

    def __init__(self, cfg: CalibrationConfig, labels: np.ndarray, total_steps: int, seed: int):
        self.cfg, self.total = cfg, total_steps
        self.held = np.empty(0, np.int64)  # training-set indices kept out of training
        self.note: str | None = None  # why the LOO is uncalibrated
        self.fits: list[tuple[int, float, float | None]] = []  # (step, log α, σ² level) of the fits frozen over
        self.frozen = False
        self.last = 1.0  # the scale the latest evaluation read the LOO at
        if cfg.scale is not None:
            return
        if cfg.source == "none":
            self.note = "uncalibrated: calibration.source is none"
        elif cfg.source == "split":
            k = min(cfg.max_examples, int(cfg.fraction * len(labels)))
            if k < cfg.min_examples:
                self.note = (f"uncalibrated: {cfg.fraction:g} of {len(labels)} training examples is {k}, fewer than "
                             f"calibration.min_examples ({cfg.min_examples}); raise calibration.fraction or use "
                             "source: test")
            else:
                order = stratified_permutation(labels, np.random.default_rng(seed))
                self.held = np.sort(order[:k])

    @property
    def active(self) -> bool:
        return self.cfg.scale is not None or self.note is None

    @property
    def fixed(self) -> bool:
        return self.cfg.scale is not None

    def trained(self, n: int) -> np.ndarray:
        """The training-set indices the job trains on (all but the held-out split)."""
        keep = np.ones(n, bool)
        keep[self.held] = False
        return np.flatnonzero(keep)

    def form(self, form: str, default: str, monitor: str = "loo") -> str:
        """The sensitivity form the job scores in, for the configured ``form`` and the covariance's own default.
        "auto" where that default is Rayleigh (the optimizer's σ²) is first order while calibrated: the fitted scale
        sets the level the Rayleigh correction would have moved, and the pass costs one first-order pass instead of
        two (the forms' level, trend, stopping and label issues side by side: docs/calibration.md,
        docs/label-issues.md). Early stopping on ``loo_capped`` keeps the form that has a cap."""
        if form == "auto" and default == "rayleigh" and self.active and monitor != "loo_capped":
            return "first_order"
        return form

    def describe(self) -> str:
        """One line: what the LOO's level is calibrated on."""
        if not self.active:
            return self.note or "uncalibrated"
        if self.fixed:
            return f"calibrated by a fixed scale {self.cfg.scale:g} on σ² (calibration.scale)"
        on = (f"{len(self.held)} training examples held out of training" if self.cfg.source == "split"
              else "the test split")
        how = {"refit": "refitted at every evaluation",
               "frozen": f"fitted over the first {self.cfg.freeze_at:.0%} of the run, then fixed",
               "frozen_variance": f"fitted over the first {self.cfg.freeze_at:.0%} of the run, then fixed with σ²'s "
                                  "level"}[self.cfg.mode]
        return f"calibrated on {on}, {how}"

    def update(self, res: SensitivityResult, estimate: Callable[[Tensor], float], target: float | None,
               step: int, level: float | None) -> tuple[SensitivityResult, dict[str, float]]:
        """The result at the scale this evaluation reads the LOO at, and the calibration's metrics. ``estimate``
        maps per-example LOO losses to the estimate; ``target``: the held-out NLL (None when fixed); ``level``:
        σ²'s level (``variance_level``)."""
        metrics = {"loo_raw": float(estimate(res.loo_losses))}
        if not self.active or len(res) == 0:
            return res, metrics
        if self.fixed:
            alpha = float(self.cfg.scale)
        else:
            fit, reached = fit_scale(res, target, estimate)
            metrics["calibration_fit"] = fit
            metrics["calibration_reached"] = float(reached)  # 0: no scale makes the LOO the held-out NLL
            if self.cfg.mode == "refit" or not (self.fits or reached):
                alpha = fit  # nothing to freeze yet: early on the training loss itself can exceed the held-out NLL
            else:
                if not self.frozen and reached and (not self.fits or step <= self.cfg.freeze_at * self.total):
                    self.fits.append((step, math.log(fit), level))
                else:
                    self.frozen = True
                alpha = math.exp(float(np.mean([f[1] for f in self.fits])))
                metrics["calibration_step"] = float(self.fits[-1][0])
                at = self.fits[-1][2]
                if self.cfg.mode == "frozen_variance" and at is not None and level is not None:
                    alpha *= at / level
        metrics["calibration_scale"] = self.last = alpha
        return rescale(res, alpha), metrics

    def state_dict(self) -> dict:
        return {"fits": list(self.fits), "frozen": self.frozen, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.fits = [tuple(f) for f in state["fits"]]
        self.frozen = bool(state["frozen"])
        self.last = float(state.get("last", 1.0))
