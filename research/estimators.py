"""The LOO estimators compared by the validation: which variance, at which point, in which form."""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from research.setups import HESS_INIT, Split
from sensitivity import SensitivityResult, adamw_variance, compute_sensitivities, ivon_variance, sgd_variance
from sensitivity.covariance import BlockCovariance, DenseCovariance, KFACCovariance, prior_from_weight_decay
from sensitivity.retrain import fit_map

# What the validation's hess_init leaves of itself at the end of a matched-β2 run (e^-1 of it): as a fixed damping
# it keeps the default's level on regularized digits while σ² no longer follows hess_init or the run's progress
DAMPING = HESS_INIT * math.exp(-1.0)


# name → (what it is, which optimizer's run it reads)
ESTIMATORS = {
    "ivon": ("IVON σ² as trained (β2 = 0.99999)", "ivon"),
    "ivon_b2": ("IVON σ² with β2 = 1 − 1/steps (h leaves hess_init)", "ivon_b2"),
    "ivon_learned": ("IVON σ² from the learned h alone (matched β2; hess_init's remainder β2^t·hess_init removed)",
                     "ivon_b2"),
    "ivon_damped": (f"IVON's learned h plus a fixed damping τ = {DAMPING:.2f} in place of hess_init's remainder",
                    "ivon_b2"),
    "ivon_evidence": ("IVON's learned h with an isotropic prior precision from the evidence (MacKay's fixed point) "
                      "in place of δ and hess_init's remainder", "ivon_b2"),
    "last_layer": ("last-layer GGN Laplace (dense) at the mean of the matched-β2 IVON run", "ivon_b2"),
    "ivon_head": ("IVON σ² (matched β2) for the body, exact last-layer Laplace for the head", "ivon_b2"),
    "kfac": ("K-FAC GGN Laplace refreshed at the IVON mean", "ivon"),
    "kfac_b2": ("K-FAC GGN Laplace refreshed at the mean of the matched-β2 IVON run", "ivon_b2"),
    "kfac_map": ("K-FAC GGN Laplace at a refined MAP (L-BFGS from the IVON mean)", "ivon"),
    "dense_map": ("full GGN Laplace at a refined MAP (reference, small models only)", "ivon"),
    "adamw": ("AdamW heuristic 1/(N√v + δ)", "adamw"),
    "sgd": ("SGD + diagonal GGN Laplace", "sgd"),
}


def refine(model: nn.Module, split: Split, weight_decay: float, iters: int, restarts: int = 3) -> nn.Module:
    """A copy of the model moved to (near) the MAP of the summed loss with prior precision N·δ."""
    refined = copy.deepcopy(model)
    fit_map(refined, split.xtr, split.ytr, prior_precision=prior_from_weight_decay(weight_decay, split.n),
            max_iter=iters, restarts=restarts)
    return refined


def _group(opt, p: torch.Tensor) -> dict:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def learned_curvature(opt, model: nn.Module) -> dict[str, torch.Tensor]:
    """h_learned = (h − β2^t·hess_init)/(1 − β2^t), clipped at 0: IVON's curvature with its initial value's remainder
    removed, as Adam removes the bias of its moments."""
    out = {}
    for n, p in model.named_parameters():
        rem = opt.hess_init_remainder(p)
        out[n] = ((opt.state[p]["hess"] - rem) / (1.0 - rem / _group(opt, p)["hess_init"])).clamp_min(0.0)
    return out


def learned_variance(opt, model: nn.Module, damping: float = 0.0) -> dict[str, torch.Tensor]:
    """σ² = 1/(N(h_learned + δ + damping))."""
    h, out = learned_curvature(opt, model), {}
    for n, p in model.named_parameters():
        group = _group(opt, p)
        out[n] = 1.0 / (group["ess"] * (h[n] + group["weight_decay"] + damping))
    return out


def evidence_damping(h: torch.Tensor, m: torch.Tensor, n: float, iters: int = 500) -> float:
    """The isotropic prior precision, per example as δ, that maximizes the diagonal Laplace evidence at the mean m
    for posterior precisions n(h + τ): MacKay's fixed point τ = γ/(n‖m‖²), γ = Σ h/(h + τ) the effective number
    of parameters."""
    h, sq = h.double(), max(float(m.double().square().sum()), 1e-300)
    if not bool(torch.isfinite(h).all()) or not bool((h > 0).any()):
        raise ValueError("evidence_damping needs finite curvatures, some positive: with none learned the evidence "
                         "has no finite optimum")
    tau = 1e-3
    for _ in range(iters):
        new = float((h / (h + tau)).sum()) / (n * sq)
        if abs(new - tau) <= 1e-9 * tau:
            return new
        tau = new
    return tau


def evidence_variance(opt, model: nn.Module) -> dict[str, torch.Tensor]:
    """σ² = 1/(N(h_learned + τ)) with τ from ``evidence_damping``: a damping set by the data, not by hess_init."""
    h = learned_curvature(opt, model)
    params = dict(model.named_parameters())
    n = _group(opt, next(iter(params.values())))["ess"]
    tau = evidence_damping(torch.cat([v.flatten() for v in h.values()]),
                           torch.cat([params[k].detach().flatten() for k in h]), n)
    return {k: 1.0 / (n * (v + tau)) for k, v in h.items()}


def covariance_for(name: str, model: nn.Module, opt, split: Split, weight_decay: float, refine_iters: int = 100):
    """The variance (or covariance) of an estimator and the model it applies at; returns (var, at, seconds)."""
    t = time.perf_counter()
    data = (split.xtr, split.ytr)
    prior = prior_from_weight_decay(weight_decay, split.n)
    at = model
    if name in ("ivon", "ivon_b2"):
        var = ivon_variance(opt, model)
    elif name == "ivon_learned":
        var = learned_variance(opt, model)
    elif name == "ivon_damped":
        var = learned_variance(opt, model, DAMPING)
    elif name == "ivon_evidence":
        var = evidence_variance(opt, model)
    elif name == "adamw":
        var = adamw_variance(opt, split.n, model, weight_decay=weight_decay)
    elif name == "sgd":
        var = sgd_variance(model, data, prior_precision=prior)
    elif name == "ivon_head":
        head = DenseCovariance.last_layer(model, data, prior_precision=prior)
        var = BlockCovariance.with_last_layer(model, ivon_variance(opt, model), head)
    elif name == "last_layer":
        var = DenseCovariance.last_layer(model, data, prior_precision=prior)
    elif name in ("kfac", "kfac_b2"):
        var = KFACCovariance.fit(model, data, prior_precision=prior, mc_samples=None)
    elif name in ("kfac_map", "dense_map"):
        at = refine(model, split, weight_decay, refine_iters)
        if name == "kfac_map":
            var = KFACCovariance.fit(at, data, prior_precision=prior, mc_samples=None)
        else:
            var = DenseCovariance.laplace(at, data, prior_precision=prior)
    else:
        raise ValueError(name)
    return var, at, time.perf_counter() - t


def estimate(name: str, model: nn.Module, opt, split: Split, weight_decay: float, forms: tuple[str, ...],
             refine_iters: int = 100) -> tuple[dict[str, SensitivityResult], dict[str, float], nn.Module]:
    """Sensitivities over the training set per form, seconds per form (fit included), and the model used."""
    var, at, fit_s = covariance_for(name, model, opt, split, weight_decay, refine_iters)
    results, seconds = {}, {}
    for form in forms:  # "corrected@2": the corrected form with max_amplification=2
        t = time.perf_counter()
        kind, _, cap = form.partition("@")
        kw = {"max_amplification": float(cap)} if cap else {}
        results[form] = compute_sensitivities(at, (split.xtr, split.ytr), var, form=kind, **kw)
        seconds[form] = fit_s + time.perf_counter() - t
    return results, seconds, at


def test_nll(model: nn.Module, split: Split) -> float:
    with torch.no_grad():
        model.eval()
        out = float(nn.functional.cross_entropy(model(split.xte), split.yte))
        model.train()
    return out
