"""Ground truth for the estimators: full-batch MAP fits and brute-force leave-one-out retraining.

Used by the truth tests and the validation report. Objective: Σ_i ℓ(y_i, f(x_i; θ)) + (prior_precision / 2) ‖θ‖²,
minimized by L-BFGS with strong Wolfe line search (small models, float64).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sensitivity.losses import Loss, get_loss


def fit_map(model: nn.Module, x: Tensor, y: Tensor, loss: str | Loss = "cross_entropy", prior_precision: float = 1.0,
            max_iter: int = 500, tol: float = 1e-10, grad_tol: float = 1e-5, restarts: int = 3) -> nn.Module:
    """Minimize the regularized summed loss in place from the model's current weights; returns the model.

    Stops when the largest gradient entry is below ``grad_tol`` or after ``restarts`` L-BFGS runs.
    """
    lossf = get_loss(loss)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = lossf.value(model(x), y).sum() + 0.5 * prior_precision * sum(p.square().sum() for p in params)
        obj.backward()
        return obj

    for _ in range(restarts):  # L-BFGS stops early on flat stretches; restart until the gradient is tiny
        opt.step(closure)
        closure()
        if max(float(p.grad.abs().max()) for p in params) < grad_tol:
            break
    return model


def leave_one_out(model: nn.Module, x: Tensor, y: Tensor, indices: Sequence[int], loss: str | Loss = "cross_entropy",
                  prior_precision: float = 1.0, max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """For each i in ``indices``: refit without example i (warm start from ``model``).

    Returns the true change of f_i, shape (len(indices), K), and the true LOO loss ℓ(y_i, f_{−i}(x_i)).
    """
    lossf = get_loss(loss)
    with torch.no_grad():
        base = model(x[list(indices)])
    changes, losses = [], []
    for row, i in enumerate(indices):
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[i] = False
        m = fit_map(copy.deepcopy(model), x[keep], y[keep], lossf, prior_precision, max_iter)
        with torch.no_grad():
            f = m(x[i : i + 1])
        changes.append(f[0] - base[row])
        losses.append(lossf.value(f, y[i : i + 1])[0])
    return torch.stack(changes), torch.stack(losses)
