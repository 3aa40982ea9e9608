"""Variance providers: per-parameter σ² from IVON, AdamW, SGD (a diagonal GGN Laplace) or the user.

Each returns a ``DiagonalCovariance``; it and the richer covariances in ``sensitivity.covariance`` share one
interface, ``apply(tangents)``, which maps per-example vectors in parameter space (a dict name → tensor with
leading batch dimensions) to Σ times them. The deviation needs only Σ ∇ℓ_i, never Σ itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from sensitivity.jacobians import iter_chunks, per_example_jacobians
from sensitivity.losses import get_loss
from sensitivity.providers import provider


@runtime_checkable
class Covariance(Protocol):
    """What a covariance must do: ``apply``. It may also say which deviation form suits it and how far the
    correction may amplify a residual, as the class attributes ``default_form`` and ``default_max_amplification``
    (without them: the first-order form, capped at 2), so that ``form="auto"`` needs no list of classes."""

    def apply(self, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        """Σ v for each v in ``tangents`` (name → (..., *param.shape)); names absent from Σ give zeros."""
        ...


def default_form(cov) -> str:
    return getattr(cov, "default_form", "first_order")


def default_max_amplification(cov) -> float:
    return float(getattr(cov, "default_max_amplification", 2.0))


class DiagonalCovariance:
    """Σ = diag(σ²), stored per parameter name."""

    # the correction's series summed at ΛV's Rayleigh quotient, capped: uncapped it amplifies a diagonal's errors
    default_form, default_max_amplification = "rayleigh", 2.0

    def __init__(self, variances: Mapping[str, Tensor]):
        self.variances = dict(variances)

    def scaled(self, alpha: float) -> DiagonalCovariance:
        """αΣ."""
        return DiagonalCovariance({n: alpha * v for n, v in self.variances.items()})

    def apply(self, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, t in tangents.items():
            var = self.variances.get(name)
            out[name] = torch.zeros_like(t) if var is None else t * var.to(t.dtype)
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiagonalCovariance:
        return DiagonalCovariance({k: v.to(device=device, dtype=dtype) for k, v in self.variances.items()})


def as_covariance(model: nn.Module, variance) -> Covariance:
    """Accept σ² as a sequence aligned with ``model.parameters()``, a mapping by name, or a covariance object."""
    if isinstance(variance, Covariance) and not isinstance(variance, (Mapping, Sequence)):
        return variance
    named = dict(model.named_parameters())
    if isinstance(variance, Mapping):
        unknown = set(variance) - set(named)
        if unknown:
            raise ValueError(f"variance names parameters the model does not have: {sorted(unknown)[:5]}")
        items = dict(variance)
    elif isinstance(variance, Sequence) and not isinstance(variance, (str, bytes)):
        if len(variance) != len(named):
            raise ValueError(f"variance has {len(variance)} tensors, the model has {len(named)} parameters")
        items = dict(zip(named, variance))
    else:
        raise TypeError(f"variance must be a sequence, a mapping or a Covariance, got {type(variance).__name__}")
    checked = {}
    for name, var in items.items():
        var = torch.as_tensor(var)
        if tuple(var.shape) != tuple(named[name].shape):
            raise ValueError(f"variance of parameter {name!r} has shape {tuple(var.shape)}, "
                             f"the parameter {tuple(named[name].shape)}")
        if not torch.isfinite(var).all():
            raise ValueError(f"variance of parameter {name!r} has non-finite values")
        if (var < 0).any():
            raise ValueError(f"variance of parameter {name!r} has negative values")
        checked[name] = var.detach()
    return DiagonalCovariance(checked)


def _aligned(model: nn.Module | None, params: list[Tensor], variances: list[Tensor]) -> dict[str, Tensor] | list:
    if model is None:
        return variances
    by_id = {id(p): v for p, v in zip(params, variances)}
    return {name: by_id.get(id(p), torch.zeros_like(p)) for name, p in model.named_parameters()}


def ivon_variance(optimizer, model: nn.Module | None = None):
    """σ² = 1 / (ess (h + δ)) from an ``ivon_core.IVON`` or an official ``ivon.IVON`` optimizer.

    Without ``model`` the list follows the optimizer's parameter order; with it, a mapping by the model's
    parameter names (parameters the optimizer does not hold get σ² = 0).
    """
    params, variances = [], []
    if hasattr(optimizer, "variances"):
        variances = optimizer.variances()
        params = [p for g in optimizer.param_groups for p in g["params"]]
    else:  # ivon-opt keeps one flat hess vector per group
        for group in optimizer.param_groups:
            flat = 1.0 / (group["ess"] * (group["hess"] + group["weight_decay"]))
            offset = 0
            for p in group["params"]:
                params.append(p)
                variances.append(flat[offset : offset + p.numel()].view_as(p).detach().clone())
                offset += p.numel()
    return _aligned(model, params, variances)


def adamw_variance(optimizer: torch.optim.Optimizer, n_train: int, model: nn.Module | None = None,
                   weight_decay: float | None = None):
    """The MPE heuristic for Adam(W): σ² = 1 / (N √v + δ), v the raw second moment (no bias correction, no ε)."""
    if n_train <= 0:
        raise ValueError(f"Invalid n_train: {n_train!r} (must be > 0)")
    params, variances = [], []
    for group in optimizer.param_groups:
        delta = group.get("weight_decay", 0.0) if weight_decay is None else weight_decay
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" not in st:
                raise ValueError("the optimizer has no second-moment state yet: take a step first")
            params.append(p)
            variances.append(1.0 / (n_train * st["exp_avg_sq"].sqrt() + delta))
    return _aligned(model, params, variances)


def sgd_variance(model: nn.Module, data, loss: str = "cross_entropy", prior_precision: float = 1.0,
                 chunk_size: int = 256, noise_var: float = 1.0) -> DiagonalCovariance:
    """Diagonal GGN Laplace at the current weights: σ² = 1 / (Σ_i diag(J_iᵀ Λ_i J_i) + prior_precision).

    Exact (K per-example vector-Jacobian products of Λ_i^{1/2} columns), refitted on each call.
    """

    if not prior_precision > 0:
        raise ValueError(f"Invalid prior_precision: {prior_precision!r} (must be > 0)")
    lossf = get_loss(loss, noise_var)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    diag = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for x, _, _ in iter_chunks(data, chunk_size, model):
            logits, jac = per_example_jacobians(model, params, x)  # jac[name]: (B, K, *shape) = J_iᵀ columns
            root = lossf.hessian_factor(logits)  # L Lᵀ = Λ
            for n, j in jac.items():
                jf = j.reshape(j.shape[0], j.shape[1], -1)  # (B, K, P)
                proj = torch.einsum("bkp,bkr->brp", jf, root)  # Lᵀ J
                diag[n] += proj.square().sum((0, 1)).view_as(diag[n])
    finally:
        model.train(was_training)
    return DiagonalCovariance({n: 1.0 / (d + prior_precision) for n, d in diag.items()})


@provider("optimizer")
def _job_optimizer(model, data, *, prior_precision, chunk_size, optimizer_variance):
    """The optimizer's own σ² (IVON: 1/(N(h + δ)); AdamW's and SGD's stand-ins), as it is."""
    return optimizer_variance
