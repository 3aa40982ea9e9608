"""Metrics on predictive probabilities: accuracy, NLL, expected calibration error, Brier score.

All take ``probs`` of shape (N, K) (rows summing to one) and integer ``targets`` of shape (N,).
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-12


def _check(probs: Tensor, targets: Tensor) -> Tensor:
    """``targets`` on the device of ``probs`` (metrics of a GPU model's outputs against CPU labels work too)."""
    if probs.ndim != 2 or targets.ndim != 1 or probs.shape[0] != targets.shape[0]:
        raise ValueError(f"expected probs (N, K) and targets (N,), got {tuple(probs.shape)} and {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= probs.shape[1]):
        raise ValueError(f"targets must lie in [0, {probs.shape[1]}), got range [{int(targets.min())}, "
                         f"{int(targets.max())}]")
    return targets.to(probs.device)


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Fraction of examples whose most probable class is the target."""
    targets = _check(probs, targets)
    return float((probs.argmax(1) == targets).double().mean()) if len(targets) else float("nan")


def nll(probs: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood −log p(y_i | x_i)."""
    targets = _check(probs, targets)
    p = probs.gather(1, targets[:, None]).squeeze(1).double()
    return float(-p.clamp_min(_EPS).log().mean()) if len(targets) else float("nan")


def brier(probs: Tensor, targets: Tensor) -> float:
    """Mean over examples of Σ_k (p_ik − 1[y_i = k])²."""
    targets = _check(probs, targets)
    onehot = torch.nn.functional.one_hot(targets, probs.shape[1]).to(torch.float64)
    return float((probs.double() - onehot).square().sum(1).mean()) if len(targets) else float("nan")


def ece(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: Σ_b (n_b/N) |acc_b − conf_b| over ``n_bins`` equal-width confidence bins."""
    targets = _check(probs, targets)
    if not len(targets):
        return float("nan")
    conf, pred = probs.double().max(1)
    correct = (pred == targets).double()
    bins = torch.clamp((conf * n_bins).ceil().long() - 1, 0, n_bins - 1)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, correct)
    return float((conf_sum - acc_sum).abs().sum() / len(targets))


def all_metrics(probs: Tensor, targets: Tensor) -> dict[str, float]:
    """accuracy, nll, ece and brier in one dict."""
    return {"accuracy": accuracy(probs, targets), "nll": nll(probs, targets), "ece": ece(probs, targets),
            "brier": brier(probs, targets)}
