"""Per-example losses on network outputs f (N, K): value ℓ(y, f), residual e = ∂ℓ/∂f, curvature Λ = ∂²ℓ/∂f²."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class Loss:
    """A likelihood on outputs: ``name`` is one of "cross_entropy", "binary_logistic", "squared_error"."""

    name: str
    noise_var: float = 1.0  # squared error only: ℓ = (f − y)² / (2 s²) + ½ log(2π s²)

    def check_targets(self, logits: Tensor, targets: Tensor, offset: int = 0) -> None:
        """Raise ValueError naming the first offending example (by its index in the data source)."""
        if logits.shape[0] != targets.shape[0]:
            raise ValueError(f"{logits.shape[0]} outputs but {targets.shape[0]} targets (examples from {offset})")
        bad = ~torch.isfinite(logits).all(1)
        if bad.any():
            raise ValueError(f"non-finite model output for example {offset + int(bad.nonzero()[0, 0])}")
        k = logits.shape[1]
        if self.name == "cross_entropy":
            if targets.ndim != 1:
                raise ValueError(f"cross_entropy needs class-index targets of shape (N,), got {tuple(targets.shape)}")
            out = (targets < 0) | (targets >= k)
            if out.any():
                i = int(out.nonzero()[0, 0])
                raise ValueError(f"label {int(targets[i])} of example {offset + i} is outside [0, {k})")
        elif self.name == "binary_logistic":
            if k != 1:
                raise ValueError(f"binary_logistic needs one output per example, got {k}")
            out = (targets.reshape(-1) != 0) & (targets.reshape(-1) != 1)
            if out.any():
                i = int(out.nonzero()[0, 0])
                raise ValueError(f"label {float(targets.reshape(-1)[i])} of example {offset + i} is not 0 or 1")
        else:
            t = targets.reshape(targets.shape[0], -1)
            if t.shape[1] != k:
                raise ValueError(f"squared_error targets have {t.shape[1]} values per example, outputs {k}")
            bad = ~torch.isfinite(t).all(1)
            if bad.any():
                raise ValueError(f"non-finite target for example {offset + int(bad.nonzero()[0, 0])}")

    def value(self, logits: Tensor, targets: Tensor) -> Tensor:
        """ℓ(y_i, f_i) per example, shape (N,)."""
        if self.name == "cross_entropy":
            return F.cross_entropy(logits, targets.long(), reduction="none")
        if self.name == "binary_logistic":
            return F.binary_cross_entropy_with_logits(logits[:, 0], targets.reshape(-1).to(logits.dtype),
                                                      reduction="none")
        diff = logits - targets.reshape(logits.shape).to(logits.dtype)
        return (diff.square().sum(1) / (2 * self.noise_var)
                + 0.5 * logits.shape[1] * math.log(2 * math.pi * self.noise_var))

    def residual(self, logits: Tensor, targets: Tensor) -> Tensor:
        """e_i = ∂ℓ/∂f at f_i, shape (N, K)."""
        if self.name == "cross_entropy":
            return torch.softmax(logits, -1) - F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype)
        if self.name == "binary_logistic":
            return torch.sigmoid(logits) - targets.reshape(logits.shape).to(logits.dtype)
        return (logits - targets.reshape(logits.shape).to(logits.dtype)) / self.noise_var

    def hessian(self, logits: Tensor) -> Tensor:
        """Λ_i = ∂²ℓ/∂f² at f_i, shape (N, K, K)."""
        if self.name == "cross_entropy":
            p = torch.softmax(logits, -1)
            return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        if self.name == "binary_logistic":
            p = torch.sigmoid(logits)
            return (p * (1 - p))[:, :, None]
        eye = torch.eye(logits.shape[1], dtype=logits.dtype, device=logits.device)
        return eye.expand(logits.shape[0], -1, -1) / self.noise_var

    def hessian_factor(self, logits: Tensor) -> Tensor:
        """L_i with L_i L_iᵀ = Λ_i (N, K, K), in closed form: D^{1/2}(I − √p √pᵀ) for softmax, D = diag(p)."""
        if self.name == "cross_entropy":
            p = torch.softmax(logits, -1)
            r = p.sqrt()
            eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
            return r[:, :, None] * (eye - r[:, :, None] * r[:, None, :])
        if self.name == "binary_logistic":
            p = torch.sigmoid(logits)
            return (p * (1 - p)).sqrt()[:, :, None]
        eye = torch.eye(logits.shape[1], dtype=logits.dtype, device=logits.device)
        return eye.expand(logits.shape[0], -1, -1) / self.noise_var**0.5

    def hessian_product(self, logits: Tensor, v: Tensor) -> Tensor:
        """Λ_i v_i (N, K) in O(K) per example: p ⊙ v − p (pᵀv) for softmax (forming L_i took O(K²): at K = 100
        it cost more than a first-order pass of an MLP)."""
        if self.name == "cross_entropy":
            p = torch.softmax(logits, -1)
            return p * (v - (p * v).sum(1, keepdim=True))
        if self.name == "binary_logistic":
            p = torch.sigmoid(logits)
            return p * (1 - p) * v
        return v / self.noise_var

    def probs(self, logits: Tensor) -> Tensor | None:
        """Predictive probabilities for classification losses (N, K'), None for regression."""
        if self.name == "cross_entropy":
            return torch.softmax(logits, -1)
        if self.name == "binary_logistic":
            p = torch.sigmoid(logits[:, 0])
            return torch.stack([1 - p, p], 1)
        return None


LOSSES = ("cross_entropy", "binary_logistic", "squared_error")


def get_loss(loss: str | Loss, noise_var: float = 1.0) -> Loss:
    if isinstance(loss, Loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"Invalid loss: {loss!r} (must be one of {LOSSES})")
    if not (noise_var > 0 and math.isfinite(noise_var)):
        raise ValueError(f"Invalid noise_var: {noise_var!r} (must be a finite number > 0)")
    return Loss(loss, float(noise_var))
