"""The result of a sensitivity pass: per-example tensors, the LOO estimate, rankings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SensitivityResult:
    """Per-example tensors (row i is the data source's example ``indices[i]``) and the LOO estimate.

    How far the numbers hold (docs/validation.md, `ivon-diag validate`, truth: retraining without each of the N
    examples): the *ranking* of examples by LOO loss follows the retrained one on digits (per-example Spearman 0.73
    to 1.00 across covariances) but weakly on breast cancer with 15% flipped labels (0.48 to 0.50); it flags flipped
    labels (AUROC 0.96 to 0.99 at 10 to 30% uniform flips) and, averaged over a run's evaluations (the store's
    ``loo_loss_mean``), keeps flagging them after training has memorized them (0.997 to 1.000). The *level* of
    ``loo`` is exact only with the full covariance and the corrected form at a converged MAP (1.07×); with IVON's
    diagonal σ² (β2 matched to the run) it is 0.05× to 1.54× the retrained LOO in the Rayleigh form (the default,
    capped at 2) and 0.02× to 0.66× in the first-order form, with the last-layer Laplace
    (``DenseCovariance.last_layer``, corrected) 0.60× to 0.91×. Its trend over training holds only in some settings:
    the default's Spearman with the test NLL 0.87 on digits with δ = 3e-3 and 0.82 on breast cancer with memorized
    flips, but −0.05 with 20% of digits' labels flipped and memorized (the first-order form: −0.79, falling while
    the test NLL rises). It is not yet a reliable signal to stop training on. There ``capped`` (the share of
    examples whose correction hit the cap) followed the test NLL (Spearman 0.98; 0.66 with breast cancer's flips),
    but it also reached 9% in a clean run: a sign to inspect.
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
    extra: dict = field(default_factory=dict)

    @property
    def loo(self) -> float:
        """The LOO estimate of the generalization loss, mean_i ℓ(y_i, f_i + Δ_i) (nan when empty)."""
        return float(self.loo_losses.double().mean()) if len(self.loo_losses) else float("nan")

    @property
    def capped(self) -> float:
        """Share of examples whose correction's amplification was capped (0 when empty)."""
        return float(self.guarded.double().mean()) if len(self.guarded) else 0.0

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
    probs = None if parts[0].loo_probs is None else torch.cat([p.loo_probs for p in parts])
    return SensitivityResult(**cat, form=form, loo_probs=probs)
