"""Memory-perturbation sensitivities and the leave-one-out estimate (Nickl et al. 2023; shared/DESIGN.md §3).

For example i with outputs f_i at the mean, residual e_i = ∂ℓ/∂f and Λ_i = ∂²ℓ/∂f²:
  first_order  Δ_i = V_i e_i = J_i Σ ∇_θ ℓ_i            (one per-example VJP and one JVP; J_i never formed)
  corrected    Δ_i = V_i (I − Λ_i V_i)^{-1} e_i        (V_i = J_i Σ J_iᵀ from K VJPs, K×K per example)
  second_order Δ_i = V_i (e_i + c_i), c_i = Λ_i V_i e_i  (the corrected form's series to two terms: two
                                                        first-order passes whatever K; ‖c_i‖ capped at
                                                        (max_amplification − 1) ‖e_i‖)
  rayleigh     Δ_i = V_i e_i + V_i u_i / (1 − d_i),     (the corrected form's series summed as a geometric series
               u_i = Λ_i V_i e_i,                        along u_i, whose ratio is ΛV's Rayleigh quotient there:
               d_i = u_iᵀ V_i u_i / u_iᵀ V_i e_i          the cost of second_order, exact where Λ_i has rank one,
                                                         i.e. K = 2 or a binary loss; d_i capped at 1 − 1/A)
  diagonal     Δ_i = diag(V_i) ⊙ e_i                    (the MPE authors' form)
LOO estimate = (1/N) Σ_i ℓ(y_i, f_i + Δ_i); sensitivity score ‖Δ_i‖_1 (diagonal: Σ_k |e_ik p_ik(1−p_ik) v_ikk|).

The correction is guarded: with Λ = L Lᵀ and W = Lᵀ V L = Q D Qᵀ,
  (I − ΛV)^{-1} e = e + L Q (I − D)^{-1} Qᵀ Lᵀ V e,
and eigenvalues d are capped at 1 − 1/max_amplification, so no direction is amplified more than that.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from sensitivity import layerwise
from sensitivity.jacobians import functional, iter_chunks, per_example_jacobians
from sensitivity.losses import Loss, get_loss
from sensitivity.result import SensitivityResult, concat_results
from sensitivity.variance import (
    Covariance,
    DiagonalCovariance,
    as_covariance,
    default_form,
    default_max_amplification,
)

FORMS = ("corrected", "first_order", "second_order", "rayleigh", "diagonal")
TWO_PASS_FORMS = ("second_order", "rayleigh")  # two first-order passes, no V_i
CAPPED_FORMS = ("corrected", *TWO_PASS_FORMS)  # forms whose correction max_amplification caps
# "auto": corrected with a dense covariance; rayleigh with a diagonal one (IVON's σ², the AdamW and SGD heuristics);
# first order with the others (K-FAC, blocks). The correction is exact with the full covariance; with a diagonal or
# K-FAC one, uncapped, it amplifies their errors, so "auto" caps it at 10 with a dense covariance and at 2 otherwise.
# The measurements behind both choices: docs/validation.md and `python -m research.caps`.
DEFAULT_FORM = "auto"
DEFAULT_MAX_AMPLIFICATION = "auto"


def resolve_amplification(max_amplification: float | str | None, cov) -> float:
    """The cap for ``max_amplification`` ("auto" or None: 10 with a dense covariance, 2 otherwise)."""
    if max_amplification is None or max_amplification == "auto":
        return default_max_amplification(cov)
    if isinstance(max_amplification, str) or not max_amplification > 1.0:
        raise ValueError(f"Invalid max_amplification: {max_amplification!r} (must be 'auto' or a number > 1)")
    return float(max_amplification)


def resolve_form(form: str, cov) -> str:
    """The concrete form for ``form`` ("auto" picks by covariance type, see DEFAULT_FORM)."""
    if form == "auto":
        return default_form(cov)
    if form not in FORMS:
        raise ValueError(f"Invalid form: {form!r} (must be 'auto' or one of {FORMS})")
    return form
# Elements of per-example Jacobians (B·K·P) held at once by the corrected and diagonal forms: 128 MiB of float32
# on a CPU; 1 GiB on an accelerator, where small parts leave it waiting on kernel launches.
JACOBIAN_BUDGET = {"cpu": 2**25}
JACOBIAN_BUDGET_ACCELERATOR = 2**28
# Examples per part of a first-order per-layer pass on a CPU: the largest layer input or output of the part holds
# at most this many elements (4 MiB of float32). Larger parts spill the caches and page-fault on their temporaries
# (bench/sensitivity.py --cases resnet10), and the pass holds every layer's input and output of its part at once (a
# ResNet's dozens of layers): its memory goes with this size, and much below it the pass slows.
ACTIVATION_BUDGET = {"cpu": 2**20}
# outputs up to which the corrected and diagonal forms keep V_i for rescaling (sensitivity.calibration)
MAX_KEPT_OUTPUTS = 32


# ------------------------------------------------------------------------------------------- data
# ------------------------------------------------------------------------------------------- core
def _generic_first_order(f, params, cov: Covariance, x: Tensor, e: Tensor) -> Tensor:
    """J_i Σ J_iᵀ e_i over ``params`` by one per-example VJP and one JVP."""

    def pull(xi, ei):
        _, back = vjp(lambda p: f(p, xi), params)
        return back(ei)[0]

    g = vmap(pull)(x, e)
    applied = cov.apply(g)
    t = {n: applied[n] for n in params}  # jvp needs the primals' key order
    _, dev = vmap(lambda xi, ti: jvp(lambda p: f(p, xi), (params,), (ti,)))(x, t)
    return dev


def prediction_variance(cov: Covariance, jac: dict[str, Tensor]) -> Tensor:
    """V_i = J_i Σ J_iᵀ (B, K, K) from J_iᵀ columns (B, K, *shape)."""
    sj = cov.apply(jac)
    v = None
    for n, j in jac.items():
        term = torch.einsum("bkp,blp->bkl", j.flatten(2), sj[n].flatten(2))
        v = term if v is None else v + term
    return 0.5 * (v + v.transpose(1, 2))


def corrected_deviation(v: Tensor, factor: Tensor, e: Tensor,
                        max_amplification: float) -> tuple[Tensor, Tensor, Tensor]:
    """Δ = V (I − ΛV)^{-1} e for Λ = L Lᵀ (``factor`` = L), guarded; returns (Δ, guarded, (I − ΛV)^{-1} e).

    (I − ΛV)^{-1} = I + L (I − W)^{-1} Lᵀ V with W = Lᵀ V L = Q D Qᵀ; eigenvalues of W (those of ΛV) are capped
    at 1 − 1/max_amplification.
    """
    w = factor.transpose(1, 2) @ v @ factor
    d, q = torch.linalg.eigh(0.5 * (w + w.transpose(1, 2)))
    cap = 1.0 - 1.0 / max_amplification
    guarded = (d > cap).any(1)
    z = factor.transpose(1, 2) @ (v @ e[:, :, None])
    inv = 1.0 / (1.0 - d.clamp(max=cap))
    u = e[:, :, None] + factor @ (q @ (inv[:, :, None] * (q.transpose(1, 2) @ z)))
    return (v @ u)[:, :, 0], guarded, u[:, :, 0]


def series_correction(c: Tensor, e: Tensor, max_amplification: float) -> tuple[Tensor, Tensor]:
    """c = Λ V e, scaled down where ‖c‖ > (max_amplification − 1)‖e‖; returns (c, guarded).

    Along an eigenvector of ΛV with eigenvalue d the two-term series amplifies e by 1 + d (the exact correction by
    1 / (1 − d)); the cap keeps d's effect at most max_amplification − 1, as the corrected form's cap does.
    """
    room = (max_amplification - 1.0) * torch.linalg.vector_norm(e, dim=1)
    norm = torch.linalg.vector_norm(c, dim=1)
    guarded = norm > room
    scale = torch.where(guarded, room / norm.clamp_min(torch.finfo(c.dtype).tiny), torch.ones_like(norm))
    return c * scale[:, None], guarded


def rayleigh_quotient(u: Tensor, ve: Tensor, vu: Tensor, max_amplification: float) -> tuple[Tensor, Tensor]:
    """(d, guarded) for ``rayleigh``: d = uᵀVu / uᵀVe (u = Λ V e; ``ve``, ``vu`` = V e, V u), capped at
    1 − 1/max_amplification. uᵀVe = ‖Lᵀ V e‖² ≥ 0 and uᵀVu ≥ 0, so d ≥ 0; where uᵀVe vanishes so does u (d = 0)."""
    den, num = (u * ve).sum(1), (u * vu).sum(1)
    tiny = torch.finfo(u.dtype).tiny
    d = torch.where(den > tiny, num / den.clamp_min(tiny), torch.zeros_like(den)).clamp_min(0.0)
    cap = 1.0 - 1.0 / max_amplification
    return d.clamp(max=cap), d > cap


class _Plan:
    """How a chunk is computed: covered layers by the per-layer route (``sensitivity.layerwise``), the remaining
    parameters generically. For V_i only Linear layers take the per-layer route: convolutions and norms are
    faster through per-example Jacobians (ResNet-20, corrected form: 27.6x an epoch per layer vs 11x)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor], cov: Covariance, fast: bool):
        self.model, self.cov, self.params = model, cov, params
        self.blocks = layerwise.eligible_blocks(model, cov, params) if fast else []
        self.var_blocks = [b for b in self.blocks if layerwise.is_rank_one(b)]
        self.rest = self._uncovered(self.blocks)
        self.var_rest = self._uncovered(self.var_blocks)
        self.f_all = functional(model, params)
        self.f_rest = functional(model, self.rest) if self.rest else None
        self._widest: int | None = None  # elements of the largest layer input/output per example
        self._copy = False  # whether the model changes layer outputs in place (layerwise.forward)

    def first_order_rows(self, x: Tensor) -> int:
        """Examples per part of the first-order pass (all of ``x`` off the CPU or off the per-layer route)."""
        budget = ACTIVATION_BUDGET.get(x.device.type)
        if budget is None or not self.blocks or len(x) == 0:
            return max(1, len(x))
        if self._widest is None:
            try:
                _, seen = self._forward(x[:1])
            except layerwise.Reused:
                return len(x)
            self._widest = max(max(s["a"].numel(), s["z"].numel()) for s in seen.values())
        return max(1, min(len(x), budget // self._widest))

    def _uncovered(self, blocks: list) -> dict[str, Tensor]:
        covered = {n for b in blocks for n in b.params()}
        return {n: p for n, p in self.params.items() if n not in covered}

    def drop_fast(self) -> None:
        self.blocks, self.var_blocks = [], []
        self.rest, self.var_rest, self.f_rest = dict(self.params), dict(self.params), self.f_all

    def _forward(self, x: Tensor):
        # once the model is seen changing layer outputs in place, record copies at once
        logits, seen = layerwise.forward(self.model, self.blocks, x, copy=self._copy)
        self._copy = self._copy or any(s["copied"] for s in seen.values())
        return logits, seen

    def logits(self, x: Tensor):
        if self.blocks:
            return self._forward(x)
        return vmap(lambda xi: self.f_all(self.rest, xi))(x), None

    def first_order(self, x, logits, seen, e) -> Tensor:
        dev = torch.zeros_like(logits)
        if self.blocks:
            dev = dev + layerwise.first_order(self.model, self.blocks, x, logits, seen, e)
        if self.rest:
            dev = dev + _generic_first_order(self.f_rest, self.rest, self.cov, x, e)
        return dev

    def variance(self, x, logits, seen) -> Tensor:
        v = torch.zeros(logits.shape[0], logits.shape[1], logits.shape[1], dtype=logits.dtype, device=logits.device)
        if self.var_blocks:
            v = v + layerwise.prediction_variance(self.var_blocks, logits, seen)
        if self.var_rest:
            _, jac = per_example_jacobians(self.model, self.var_rest, x)
            v = v + prediction_variance(self.cov, jac)
        return 0.5 * (v + v.transpose(1, 2))

    def rows_per_part(self, n_out: int) -> int:
        size = sum(p.numel() for p in self.var_rest.values())
        device = next(iter(self.var_rest.values())).device.type
        budget = JACOBIAN_BUDGET.get(device, JACOBIAN_BUDGET_ACCELERATOR)
        return max(1, budget // max(1, n_out * size))


def _chunk(plan: _Plan, lossf: Loss, x, y, offset, form, max_amplification):
    logits, seen = plan.logits(x)
    lossf.check_targets(logits.detach(), y, offset)
    logits_d = logits.detach()
    e = lossf.residual(logits_d, y)
    none_guarded = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    # the last two items: ẽ, the residual the form corrects e to (Δ = V ẽ; the diagonal form has none: e), and what
    # the deviation at a scaled covariance αΣ is recomputed from (sensitivity.calibration)
    if form == "first_order":
        ve = plan.first_order(x, logits, seen, e)
        return logits_d, e, ve, none_guarded, None, e, {"ve": ve}
    if form == "second_order":
        ve = plan.first_order(x, logits, seen, e)
        raw = lossf.hessian_product(logits_d, ve)
        c, guarded = series_correction(raw, e, max_amplification)
        vc = plan.first_order(x, logits, seen, c)
        scale = _ratio(c, raw)
        return logits_d, e, ve + vc, guarded, None, e + c, {"ve": ve, "c": raw, "vc": vc / scale[:, None]}
    if form == "rayleigh":
        ve = plan.first_order(x, logits, seen, e)
        u = lossf.hessian_product(logits_d, ve)
        vu = plan.first_order(x, logits, seen, u)
        d_raw, _ = rayleigh_quotient(u, ve, vu, float("inf"))
        d, guarded = rayleigh_quotient(u, ve, vu, max_amplification)
        return (logits_d, e, ve + vu / (1.0 - d)[:, None], guarded, None, e + u / (1.0 - d)[:, None],
                {"ve": ve, "u": u, "vu": vu, "d": d_raw})
    v = plan.variance(x, logits, seen)
    kept = {"v": v} if v.shape[1] <= MAX_KEPT_OUTPUTS else {}  # K×K per example: kept for small K only
    if form == "diagonal":
        return logits_d, e, torch.diagonal(v, dim1=1, dim2=2) * e, none_guarded, v, e, kept
    dev, guarded, corrected = corrected_deviation(v, lossf.hessian_factor(logits_d), e, max_amplification)
    return logits_d, e, dev, guarded, v, corrected, kept


def _ratio(scaled: Tensor, raw: Tensor) -> Tensor:
    """Per row, the factor ``series_correction`` scaled ``raw`` by (1 where raw vanishes)."""
    n = torch.linalg.vector_norm(raw, dim=1)
    return torch.where(n > 0, torch.linalg.vector_norm(scaled, dim=1) / n.clamp_min(torch.finfo(raw.dtype).tiny),
                       torch.ones_like(n))


def iter_sensitivities(model: nn.Module, data, variance, loss: str | Loss = "cross_entropy", *,
                       form: str = DEFAULT_FORM, chunk_size: int = 256, noise_var: float = 1.0,
                       max_amplification: float | str | None = DEFAULT_MAX_AMPLIFICATION,
                       fast: bool = True) -> Iterator[SensitivityResult]:
    """Stream ``SensitivityResult`` chunks over the data source: memory bounded by ``chunk_size``, not by N.

    ``fast`` computes Linear, Conv2d and norm layers by the per-layer route (``sensitivity.layerwise``), which holds
    one layer's per-example gradients at a time instead of the whole model's; results are identical.
    """
    if form != "auto" and form not in FORMS:
        raise ValueError(f"Invalid form: {form!r} (must be 'auto' or one of {FORMS})")
    lossf = get_loss(loss, noise_var)
    cov = as_covariance(model, variance)
    form = resolve_form(form, cov)
    max_amplification = resolve_amplification(max_amplification, cov)
    if isinstance(cov, DiagonalCovariance):
        p0 = next(model.parameters())
        cov = cov.to(p0.device, p0.dtype)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    plan = _Plan(model, params, cov, fast)
    n_out = None
    was_training = model.training
    model.eval()  # normalization layers use their running statistics; dropout is off
    try:
        for x, y, idx in iter_chunks(data, chunk_size, model):
            first = form == "first_order" or form in TWO_PASS_FORMS  # no V_i: parts by activations, not Jacobians
            if n_out is None and not first and plan.var_rest:
                with torch.no_grad():
                    n_out = plan.f_all(params, x[0]).numel()
            if first:
                per = plan.first_order_rows(x)
            else:
                per = len(x) if not plan.var_rest else plan.rows_per_part(n_out)
            for s in range(0, len(x), per):
                xs, ys, ids = x[s : s + per], y[s : s + per], idx[s : s + per]
                offset = int(ids[0]) if len(ids) else 0
                try:
                    out = _chunk(plan, lossf, xs, ys, offset, form, max_amplification)
                except layerwise.Reused:
                    plan.drop_fast()
                    out = _chunk(plan, lossf, xs, ys, offset, form, max_amplification)
                yield _result(lossf, form, ids, ys, *out, max_amplification)
    finally:
        model.train(was_training)


def _result(lossf: Loss, form, ids, y, logits, e, dev, guarded, v, corrected, parts,
            max_amplification) -> SensitivityResult:
    logits, dev = logits.detach(), dev.detach()
    loo_logits = logits + dev
    if form == "diagonal":
        p = lossf.probs(logits)
        lam = p * (1 - p) if lossf.name == "cross_entropy" else torch.ones_like(e)
        if lossf.name == "binary_logistic":
            lam = p[:, 1:] * (1 - p[:, 1:])
        scores = (e * lam * torch.diagonal(v, dim1=1, dim2=2)).abs().sum(1)
    else:
        scores = dev.abs().sum(1)
    loo_losses = lossf.value(loo_logits, y)
    loo_probs = None
    if lossf.name in ("cross_entropy", "binary_logistic"):
        loo_probs = torch.exp(-loo_losses)
    return SensitivityResult(
        indices=ids.cpu(), targets=y.cpu(), logits=logits.cpu(), residuals=e.cpu(), deviations=dev.cpu(),
        scores=scores.cpu(), losses=lossf.value(logits, y).cpu(), loo_losses=loo_losses.cpu(),
        guarded=guarded.cpu(), form=form, loo_probs=None if loo_probs is None else loo_probs.cpu(),
        corrected_residuals=corrected.detach().cpu(), loss=lossf, max_amplification=max_amplification,
        scale_parts={k: t.detach().cpu() for k, t in parts.items()},
    )


def compute_sensitivities(model: nn.Module, data, variance, loss: str | Loss = "cross_entropy", *,
                          form: str = DEFAULT_FORM, chunk_size: int = 256, noise_var: float = 1.0,
                          max_amplification: float | str | None = DEFAULT_MAX_AMPLIFICATION,
                          fast: bool = True) -> SensitivityResult:
    """Sensitivities, per-example LOO losses and the LOO estimate over a data source, at the model's weights.

    ``data``: (inputs, targets) tensors, or a DataLoader yielding (inputs, targets[, indices]).
    ``variance``: σ² per parameter (sequence in ``model.parameters()`` order, or mapping by name), or a
    covariance object (``DiagonalCovariance``, ``DenseCovariance``, ``KFACCovariance``).
    ``form``: "auto", "first_order", "corrected", "second_order", "rayleigh" or "diagonal" (module docstring);
    ``max_amplification`` caps the corrected, second-order and Rayleigh forms' correction ("auto": 10 with a dense
    covariance, 2 otherwise; see DEFAULT_FORM).
    """
    parts: list[SensitivityResult] = []
    rows: list[int] = []
    for part in iter_sensitivities(model, data, variance, loss, form=form, chunk_size=chunk_size,
                                   noise_var=noise_var, max_amplification=max_amplification, fast=fast):
        parts.append(part)
        rows.append(len(part.indices))
        # joined as they come, a part with the one before it once it is as large (a binary counter: a few parts
        # held, not one per chunk): each chunk's small tensors, kept to the end between its large temporaries,
        # would pin the heap's freed pages and grow the process with N (bench/memory.py)
        while len(parts) > 1 and rows[-1] >= rows[-2]:
            parts[-2:] = [concat_results(parts[-2:], part.form)]
            rows[-2:] = [rows[-2] + rows[-1]]
    return concat_results(parts, parts[0].form if parts else form)
