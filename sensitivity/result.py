"""The result of a sensitivity pass: per-example tensors, the LOO estimate, rankings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SensitivityResult:
    """Per-example tensors (row i is the data source's example ``indices[i]``) and the LOO estimate.

    ``loo`` is (1/N) Σ ℓ(y_i, f_i + Δ_i); ``capped`` the share of examples whose correction hit its cap. How far
    the ranking and the level hold against retraining, for each covariance and form: docs/validation.md.
    """

    indices: Tensor  # (N,) stable example index
    targets: Tensor  # (N,) or (N, K)
    logits: Tensor  # (N, K) f_i at the mean
    residuals: Tensor  # (N, K) e_i
    deviations: Tensor  # (N, K) Δ_i
    scores: Tensor  # (N,) sensitivity score
    losses: Tensor  # (N,) ℓ(y_i, f_i)
    loo_losses: Tensor  # (N,) ℓ(y_i, f_i + Δ_i)
    guarded: Tensor  # (N,) bool: the correction's amplification was capped for this example
    form: str
    loo_probs: Tensor | None = None  # (N,) out-of-sample probability of the given label, softmax(f_i + Δ_i)_y
    corrected_residuals: Tensor | None = None  # (N, K) ẽ_i, with Δ_i = V_i ẽ_i (the form's correction of e_i)
    extra: dict = field(default_factory=dict)
    # what ``sensitivity.calibration.rescale`` recomputes the deviations at a scaled covariance from
    loss: object | None = None  # the sensitivity.losses.Loss the pass used
    max_amplification: float | None = None
    scale_parts: dict[str, Tensor] | None = None

    @property
    def loo(self) -> float:
        """The LOO estimate of the generalization loss, mean_i ℓ(y_i, f_i + Δ_i) (nan when empty)."""
        return float(self.loo_losses.double().mean()) if len(self.loo_losses) else float("nan")

    @property
    def capped(self) -> float:
        """Share of examples whose correction's amplification was capped (0 when empty)."""
        return float(self.guarded.double().mean()) if len(self.guarded) else 0.0

    def loo_class_probs(self) -> Tensor:
        """(N, K) each example's class probabilities predicted without it, softmax(f_i + Δ_i) (for one logit, the
        binary logistic's [1 − σ, σ]): out-of-sample probabilities in the layout of cleanlab's ``pred_probs``."""
        if self.loo_probs is None:
            raise ValueError("class probabilities need a classification loss (cross_entropy or binary_logistic)")
        logits = self.logits + self.deviations
        if logits.shape[1] == 1:
            p = torch.sigmoid(logits[:, 0])
            return torch.stack([1 - p, p], 1)
        return torch.softmax(logits, -1)

    def __len__(self) -> int:
        return len(self.indices)

    def top_k(self, k: int) -> Tensor:
        """Example indices of the k most sensitive examples, most sensitive first."""
        order = torch.argsort(self.scores, descending=True, stable=True)[:k]
        return self.indices[order]

    def bottom_k(self, k: int) -> Tensor:
        """Example indices of the k least sensitive examples, least sensitive first."""
        order = torch.argsort(self.scores, stable=True)[:k]
        return self.indices[order]


def concat_results(parts: list[SensitivityResult], form: str) -> SensitivityResult:
    """One result from streamed chunks."""
    if not parts:
        empty = torch.empty(0)
        return SensitivityResult(torch.empty(0, dtype=torch.long), empty, torch.empty(0, 0), torch.empty(0, 0),
                                 torch.empty(0, 0), empty, empty, empty, torch.empty(0, dtype=torch.bool), form,
                                 empty)
    cat = {name: torch.cat([getattr(p, name) for p in parts]) for name in
           ("indices", "targets", "logits", "residuals", "deviations", "scores", "losses", "loo_losses", "guarded")}
    optional = {name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
                for name in ("loo_probs", "corrected_residuals")}
    scale_parts = None
    if parts[0].scale_parts is not None:
        scale_parts = {k: torch.cat([p.scale_parts[k] for p in parts]) for k in parts[0].scale_parts}
    return SensitivityResult(**cat, form=form, **optional, loss=parts[0].loss,
                             max_amplification=parts[0].max_amplification, scale_parts=scale_parts)
