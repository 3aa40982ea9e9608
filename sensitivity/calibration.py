"""The LOO estimate at a scaled covariance αΣ, and the α at which it matches a held-out loss.

The level of the LOO estimate follows the covariance's scale, which IVON's σ² = 1/(N(h + δ)) takes mostly from
hess_init (docs/validation.md); the paper picks hess_init on a grid against held-out data. Scaling Σ after the pass
costs no model evaluation: every form's deviation at αΣ follows from what the pass kept (``scale_parts``):
  first_order  Δ(α) = α Ve
  second_order Δ(α) = α Ve + α V c(α),  c(α) = α ΛVe capped as the pass capped it
  rayleigh     Δ(α) = α Ve + α² Vu / (1 − α d),  d the uncapped Rayleigh quotient at α = 1, α d capped
  corrected    Δ(α) = αV (I − ΛαV)^{-1} e, guarded;  diagonal: α diag(V) ⊙ e
How a calibrated level holds against held-out data and retraining: docs/calibration.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from sensitivity.deviations import MAX_KEPT_OUTPUTS, corrected_deviation, series_correction
from sensitivity.result import SensitivityResult
from sensitivity.variance import as_covariance

SCALE_RANGE = (1e-6, 1e6)


def _deviation(res: SensitivityResult, alpha: float) -> tuple[Tensor, Tensor]:
    parts, form, cap = res.scale_parts, res.form, res.max_amplification
    if form == "first_order":
        return alpha * parts["ve"], torch.zeros(len(res), dtype=torch.bool)
    if form == "second_order":
        c, guarded = series_correction(alpha * parts["c"], res.residuals, cap)
        ratio = torch.linalg.vector_norm(c, dim=1) / torch.linalg.vector_norm(parts["c"], dim=1).clamp_min(1e-300)
        return alpha * parts["ve"] + alpha * ratio[:, None] * parts["vc"], guarded
    if form == "rayleigh":
        d = alpha * parts["d"]
        limit = 1.0 - 1.0 / cap
        return (alpha * parts["ve"] + alpha**2 * parts["vu"] / (1.0 - d.clamp(max=limit))[:, None]), d > limit
    v = alpha * parts["v"]
    if form == "diagonal":
        return torch.diagonal(v, dim1=1, dim2=2) * res.residuals, torch.zeros(len(res), dtype=torch.bool)
    dev, guarded, _ = corrected_deviation(v, res.loss.hessian_factor(res.logits), res.residuals, cap)
    return dev, guarded


def rescale(res: SensitivityResult, alpha: float) -> SensitivityResult:
    """``res`` as the pass would have given it with the covariance scaled by ``alpha`` (> 0)."""
    if res.scale_parts is None or res.loss is None:
        raise ValueError("this result cannot be rescaled: it did not come from sensitivity.compute_sensitivities")
    if res.form in ("corrected", "diagonal") and "v" not in res.scale_parts and len(res):
        raise ValueError(f"the {res.form} form keeps V_i for rescaling only up to {MAX_KEPT_OUTPUTS} outputs; "
                         "use a first-order, second-order or rayleigh form")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"Invalid scale: {alpha!r} (must be a finite number > 0)")
    if alpha == 1.0 or len(res) == 0:
        return res
    dev, guarded = _deviation(res, float(alpha))
    lossf, y = res.loss, res.targets
    loo_losses = lossf.value(res.logits + dev, y)
    if res.form == "diagonal":  # the score's own form: Σ_k |e p(1−p) v_kk|, linear in α
        scores = res.scores * alpha
    else:
        scores = dev.abs().sum(1)
    probs = torch.exp(-loo_losses) if res.loo_probs is not None else None
    return replace(res, deviations=dev, loo_losses=loo_losses, scores=scores, guarded=guarded, loo_probs=probs)


def loo_at(res: SensitivityResult, alpha: float, estimate: Callable[[Tensor], float] | None = None) -> float:
    """The LOO estimate at αΣ; ``estimate`` maps per-example LOO losses to the estimate (default: their mean)."""
    losses = rescale(res, alpha).loo_losses
    return float(losses.double().mean()) if estimate is None else float(estimate(losses))


def fit_scale(res: SensitivityResult, target: float, estimate: Callable[[Tensor], float] | None = None, *,
              tol: float = 1e-4, bounds: tuple[float, float] = SCALE_RANGE) -> tuple[float, bool]:
    """The α at which the LOO estimate equals ``target`` (a held-out loss), by bisection on log α; returns (α,
    reached): where no α in ``bounds`` reaches the target, the nearer bound and False.

    The estimate grows with α (along each example's deviation the loss is convex with slope eᵀVe ≥ 0 at α = 0).
    """
    if not math.isfinite(target):
        raise ValueError(f"Invalid target: {target!r} (must be finite)")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    if loo_at(res, math.exp(lo), estimate) >= target:
        return math.exp(lo), False
    if loo_at(res, math.exp(hi), estimate) <= target:
        return math.exp(hi), False
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        value = loo_at(res, math.exp(mid), estimate)
        if abs(value - target) <= tol * max(abs(target), 1e-12) or hi - lo < 1e-9:
            return math.exp(mid), True
        lo, hi = (mid, hi) if value < target else (lo, mid)
    return math.exp(0.5 * (lo + hi)), True


def scale_covariance(model, variance, alpha: float):
    """αΣ as a covariance of the same kind (its fast paths kept): what a query at the calibrated scale uses, so that
    its deviations equal ``rescale``'s. ``variance``: σ² or a covariance object with a ``scaled`` method."""
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"Invalid scale: {alpha!r} (must be a finite number > 0)")
    cov = as_covariance(model, variance)
    if alpha == 1.0:
        return cov
    if not hasattr(cov, "scaled"):
        raise TypeError(f"{type(cov).__name__} has no scaled(alpha) method: it cannot be read at a calibrated scale")
    return cov.scaled(float(alpha))
