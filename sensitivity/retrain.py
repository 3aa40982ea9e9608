"""Ground truth for the estimators: full-batch MAP fits and brute-force leave-one-out retraining.

Used by the truth tests and the validation report. Objective: Σ_i ℓ(y_i, f(x_i; θ)) + (prior_precision / 2) ‖θ‖²,
minimized by L-BFGS with strong Wolfe line search (small models, float64).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jacrev, vmap

from sensitivity.covariance import DenseCovariance
from sensitivity.jacobians import per_example_jacobians
from sensitivity.losses import Loss, get_loss

NEWTON_GRAD_TOL = 1e-8  # largest gradient entry of the summed objective at which a Newton refit has converged
NEWTON_MAX_PARAMS = 8192  # the Newton refits hold a P×P inverse Hessian
POLISH_ROUNDS = 10  # L-BFGS runs between Newton attempts when polishing a fit
NEWTON_MAX_STEPS = 100  # then L-BFGS takes over: problems still far from converged crawl along flat valleys


def map_objective(model: nn.Module, x: Tensor, y: Tensor, loss: str | Loss = "cross_entropy",
                  prior_precision: float = 1.0) -> Tensor:
    """Σ_i ℓ(y_i, f(x_i; θ)) + (prior_precision / 2) ‖θ‖² over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return get_loss(loss).value(model(x), y).sum() + 0.5 * prior_precision * sum(p.square().sum() for p in params)


def fit_map(model: nn.Module, x: Tensor, y: Tensor, loss: str | Loss = "cross_entropy", prior_precision: float = 1.0,
            max_iter: int = 500, tol: float = 1e-10, grad_tol: float = 1e-5, restarts: int = 3,
            polish: bool = False) -> nn.Module:
    """Minimize the regularized summed loss in place from the model's current weights; returns the model.

    Stops when the largest gradient entry is below ``grad_tol`` or after ``restarts`` L-BFGS runs. Then, with
    ``polish`` and up to ``NEWTON_MAX_PARAMS`` parameters, exact Newton steps take the gradient below
    ``NEWTON_GRAD_TOL`` (each forms the Hessian: P backward passes): L-BFGS stalls near 1e-6, where the objective is
    flat to rounding but a flat valley still lets predictions off the training set move (docs/influence.md's refits
    polish; the LOO truth at training examples does not need it).
    """
    lossf = get_loss(loss)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = map_objective(model, x, y, lossf, prior_precision)
        obj.backward()
        return obj

    for _ in range(restarts):  # L-BFGS stops early on flat stretches; restart until the gradient is tiny
        opt.step(closure)
        closure()
        if max(float(p.grad.abs().max()) for p in params) < grad_tol:
            break
    if polish and sum(p.numel() for p in params) <= NEWTON_MAX_PARAMS:
        for _ in range(POLISH_ROUNDS):  # where Newton cannot go on (an indefinite Hessian), L-BFGS moves first
            if _polish(model, x, y, lossf, prior_precision):
                break
            opt.step(closure)
    return model


def _polish(model: nn.Module, x: Tensor, y: Tensor, lossf: Loss, prior: float, steps: int = 8) -> bool:
    """Newton steps from near a minimum while they shrink the gradient (the objective's value cannot tell steps
    this small apart), up to an indefinite Hessian; whether the gradient got below ``NEWTON_GRAD_TOL``."""
    named = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    rest = {**dict(model.named_buffers()),
            **{n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}}
    names, shapes, sizes = list(named), [p.shape for p in named.values()], [p.numel() for p in named.values()]

    def objective(theta: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return lossf.value(functional_call(model, (params, rest), (x,)), y).sum() + 0.5 * prior * theta.dot(theta)

    gradient = grad(objective)
    theta = torch.cat([p.reshape(-1) for p in named.values()])
    g = gradient(theta)
    for _ in range(steps):
        if float(g.abs().max()) < NEWTON_GRAD_TOL:
            break
        hess = jacrev(gradient, chunk_size=128)(theta)
        chol, info = torch.linalg.cholesky_ex(0.5 * (hess + hess.T))
        if int(info):
            break
        cand = theta - torch.cholesky_solve(g[:, None], chol)[:, 0]
        g_new = gradient(cand)
        if not float(g_new.abs().max()) < float(g.abs().max()):
            break
        theta, g = cand, g_new
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, [p for p in model.parameters() if p.requires_grad])
    return float(g.abs().max()) < NEWTON_GRAD_TOL


def leave_one_out(model: nn.Module, x: Tensor, y: Tensor, indices: Sequence[int], loss: str | Loss = "cross_entropy",
                  prior_precision: float = 1.0, max_iter: int = 200, method: str = "auto",
                  chunk: int = 64) -> tuple[Tensor, Tensor]:
    """For each i in ``indices``: refit without example i (warm start from ``model``, meant to be a MAP).

    Returns the true change of f_i, shape (len(indices), K), and the true LOO loss ℓ(y_i, f_{−i}(x_i)).

    ``method="newton"`` refits ``chunk`` problems at once (torch.func.vmap over per-problem example weights) by
    L-BFGS whose initial inverse Hessian is the exact one of the full objective at the model's weights (inverted
    once) less example i's GGN term (Woodbury, rank K): from a MAP the first step is nearly Newton's. It runs until
    the largest gradient entry is below ``NEWTON_GRAD_TOL`` (L-BFGS's default stop is 1e-5); a problem unconverged
    after ``NEWTON_MAX_STEPS`` steps (a flat valley, where removing one example moves the weights far) is finished
    by L-BFGS from where it got. The operator sets only the path; tests compare the answers with L-BFGS's. Falls
    back to the GGN where the Hessian is not positive definite (``model`` not at a minimum). ``"lbfgs"``: one L-BFGS
    refit per example. ``"auto"``: newton up to ``NEWTON_MAX_PARAMS`` parameters (it holds P×P matrices).
    """
    if method not in ("auto", "newton", "lbfgs"):
        raise ValueError(f"Invalid method: {method!r} (must be 'auto', 'newton' or 'lbfgs')")
    lossf = get_loss(loss)
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < len(x)]
    if bad:
        raise ValueError(f"leave_one_out: index {bad[0]} is outside [0, {len(x)})")
    if not indices:
        with torch.no_grad():
            k = model(x[:1]).shape[1]
        return x.new_zeros(0, k), x.new_zeros(0)
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "newton" or (method == "auto" and size <= NEWTON_MAX_PARAMS):
        return _newton(model, x, y, indices, lossf, prior_precision, max_iter, chunk)
    with torch.no_grad():
        base = model(x[indices])
    changes, losses = [], []
    for row, i in enumerate(indices):
        m = _refit(model, x, y, i, lossf, prior_precision, max_iter)
        with torch.no_grad():
            f = m(x[i : i + 1])
        changes.append(f[0] - base[row])
        losses.append(lossf.value(f, y[i : i + 1])[0])
    return torch.stack(changes), torch.stack(losses)


def _refit(model: nn.Module, x: Tensor, y: Tensor, i: int, lossf: Loss, prior: float, max_iter: int) -> nn.Module:
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[i] = False
    return fit_map(copy.deepcopy(model), x[keep], y[keep], lossf, prior, max_iter)


def _newton(model: nn.Module, x: Tensor, y: Tensor, indices: list[int], lossf: Loss, prior: float, max_iter: int,
            chunk: int) -> tuple[Tensor, Tensor]:

    named = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    rest = {**dict(model.named_buffers()),
            **{n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}}
    names, shapes = list(named), [p.shape for p in named.values()]
    sizes = [p.numel() for p in named.values()]

    def logits(theta: Tensor, xs: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return functional_call(model, (params, rest), (xs,))

    def objective(theta: Tensor, w: Tensor) -> Tensor:
        return (lossf.value(logits(theta, x), y) * w).sum() + 0.5 * prior * theta.dot(theta)

    step = vmap(grad_and_value(objective))
    theta0 = torch.cat([p.reshape(-1) for p in named.values()])
    hinv = _inverse_hessian(objective, theta0, torch.ones(len(x), dtype=x.dtype, device=x.device))
    if hinv is None:  # not positive definite (not at a minimum): the GGN's, which always is
        hinv = DenseCovariance.laplace(model, (x, y), lossf, prior).sigma
    changes, losses = [], []
    for start in range(0, len(indices), chunk):
        idx = torch.tensor(indices[start : start + chunk], device=x.device)
        with torch.no_grad():
            f0, jac = per_example_jacobians(model, named, x[idx])
        j = torch.cat([jac[n].flatten(2) for n in names], 2)  # (B, K, P)
        lam = lossf.hessian(f0)
        u = j @ hinv  # J_i H⁻¹
        eye = torch.eye(lam.shape[1], dtype=lam.dtype, device=lam.device)
        # (H − J_iᵀΛ_iJ_i)⁻¹ = H⁻¹ + H⁻¹J_iᵀ (I − Λ_i J_i H⁻¹ J_iᵀ)⁻¹ Λ_i J_i H⁻¹ (Woodbury)
        mid = torch.linalg.solve(eye - lam @ (u @ j.transpose(1, 2)), lam)
        w = torch.ones(len(idx), len(x), dtype=x.dtype, device=x.device)
        w[torch.arange(len(idx), device=x.device), idx] = 0.0
        theta = theta0.expand(len(idx), -1).clone()
        with torch.no_grad():
            theta, done = _solve(step, theta, w, u, mid, hinv, NEWTON_MAX_STEPS)
        models = [None] * len(idx)
        for b in (~done).nonzero()[:, 0].tolist():  # flat valleys (half, with memorized flips): L-BFGS
            m = copy.deepcopy(model)
            torch.nn.utils.vector_to_parameters(theta[b], [p for p in m.parameters() if p.requires_grad])
            models[b] = _refit(m, x, y, int(idx[b]), lossf, prior, max_iter)
        with torch.no_grad():
            for b, i in enumerate(idx.tolist()):
                f = (models[b](x[i : i + 1]) if models[b] is not None else logits(theta[b], x[i : i + 1]))
                changes.append(f[0] - f0[b])
                losses.append(lossf.value(f, y[i : i + 1])[0])
    return torch.stack(changes), torch.stack(losses)


def _inverse_hessian(objective, theta: Tensor, w: Tensor, chunk_size: int = 128) -> Tensor | None:
    """The exact Hessian's inverse at ``theta``, or None where it is not positive definite."""
    hess = jacrev(grad(objective), chunk_size=chunk_size)(theta, w)
    chol, info = torch.linalg.cholesky_ex(0.5 * (hess + hess.T))
    return torch.cholesky_inverse(chol) if int(info) == 0 else None


def _solve(step, theta: Tensor, w: Tensor, u: Tensor, mid: Tensor, hinv: Tensor, max_iter: int,
           memory: int = 10) -> tuple[Tensor, Tensor]:
    """L-BFGS for every problem (rows) at once, its initial inverse Hessian the Woodbury-corrected one at the start
    (Newton's step where that is exact, a quasi-Newton correction where it is not); returns the points and which
    converged."""

    def precondition(g: Tensor, rows: Tensor) -> Tensor:
        return g @ hinv + torch.einsum("bk,bkp->bp", (mid[rows] @ (u[rows] @ g[:, :, None]))[:, :, 0], u[rows])

    gradient, val = step(theta, w)
    history: list[tuple[Tensor, Tensor, Tensor]] = []  # (s, y, 1/yᵀs or 0 for a pair left out) over all rows
    stuck = torch.zeros(len(theta), dtype=torch.bool, device=theta.device)
    retried = stuck.clone()
    for _ in range(max_iter):
        live = ((gradient.abs().amax(1) >= NEWTON_GRAD_TOL) & ~stuck).nonzero()[:, 0]
        if len(live) == 0:
            break
        g = gradient[live]
        q, alphas = g.clone(), []
        for s, y, rho in reversed(history):  # the two-loop recursion, batched
            a = rho[live] * (s[live] * q).sum(1)
            q -= a[:, None] * y[live]
            alphas.append(a)
        r = precondition(q, live)
        if history:  # scale the initial operator to the latest curvature pair (sᵀy / yᵀP⁻¹y), as L-BFGS scales I
            s, y, rho = history[-1]
            py = precondition(y[live], live)
            yp = (y[live] * py).sum(1)
            r *= torch.where((rho[live] > 0) & (yp > 0), 1.0 / (rho[live] * yp).clamp_min(1e-300), 1.0)[:, None]
        for (s, y, rho), a in zip(history, reversed(alphas)):
            r += s[live] * (a - rho[live] * (y[live] * r).sum(1))[:, None]
        d = -r
        slope = (g * d).sum(1)
        uphill = slope >= 0  # the correction made the operator indefinite (removing i leaves a flat direction)
        if uphill.any():
            d[uphill] = -g[uphill] @ hinv
            slope = (g * d).sum(1)
        # a step moves no weight by more than 1 (near-flat directions make the first operator's steps huge)
        t = (1.0 / d.abs().amax(1).clamp_min(1e-300)).clamp(max=1.0)
        todo = torch.arange(len(live), device=theta.device)
        old_theta, old_grad = theta.clone(), gradient.clone()
        for _ in range(40):  # Armijo backtracking; a value within rounding of the old one is no increase
            rows = live[todo]
            cand = theta[rows] + t[todo, None] * d[todo]
            g_new, v_new = step(cand, w[rows])
            ok = (v_new - val[rows] <= 1e-4 * t[todo] * slope[todo] + 1e-13 * val[rows].abs())
            acc = rows[ok]
            theta[acc], gradient[acc], val[acc] = cand[ok], g_new[ok], v_new[ok]
            todo = todo[~ok]
            if len(todo) == 0:
                break
            t[todo] *= 0.5
        failed = torch.zeros_like(stuck)
        failed[live[todo]] = True
        stuck |= failed & retried  # a second failure in a row: the history was not the cause
        retried = failed
        s, y = theta - old_theta, gradient - old_grad
        sy = (s * y).sum(1)
        history.append((s, y, torch.where(sy > 1e-12 * s.norm(dim=1) * y.norm(dim=1), 1.0 / sy, 0.0)))
        history = [(s, y, rho.masked_fill(failed, 0.0)) for s, y, rho in history[-memory:]]  # restart those rows
    return theta, gradient.abs().amax(1) < NEWTON_GRAD_TOL
