"""Which training examples made a prediction: the memory-perturbation influence of each training example on any
query input, from the posterior covariance the LOO already uses (Nickl et al. 2023).

Removing training example i moves the parameters by about Σ J_iᵀ ẽ_i (ẽ_i: its residual as the deviation form
corrects it, with Δ_i = V_i ẽ_i for its own outputs), so a query x*'s outputs by

    Δf*_i = J* Σ J_iᵀ ẽ_i,     and its loss by   ℓ(y*, f* + Δf*_i) − ℓ(y*, f*).

The queries' rows Σ J*ᵀ (Q·K parameter vectors) are formed once; then per chunk of training examples their
weighted gradients J_iᵀ ẽ_i (one per-example VJP) and one matrix product give every (query, example) pair. No
Jacobian of the training data is formed. Exact for the chosen form and covariance (tests/test_influence.py); how
far it follows retraining: docs/influence.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from sensitivity import layerwise
from sensitivity.deviations import compute_sensitivities, resolve_amplification, resolve_form
from sensitivity.jacobians import functional, iter_chunks, per_example_jacobians
from sensitivity.losses import Loss, get_loss
from sensitivity.result import SensitivityResult
from sensitivity.variance import as_covariance, default_form

QUERY_BUDGET = 2**26  # elements of the queries' Σ J*ᵀ rows held at once (Q · K · P): 256 MiB of float32


@dataclass
class InfluenceResult:
    """Row q is query q; column j is the training example ``train_indices[j]``."""

    train_indices: Tensor  # (N,)
    query_logits: Tensor  # (Q, K) f* at the mean
    query_targets: Tensor  # (Q,) or (Q, K): the targets the losses are taken at (given, or predicted)
    output_change: Tensor | None  # (Q, N, K) Δf*: the query's outputs without the example minus with it
    loss_change: Tensor  # (Q, N): the query's loss without the example minus with it (``outputs=False``: e*ᵀ Δf*)
    form: str

    def proponents(self, query: int, k: int = 10) -> tuple[Tensor, Tensor]:
        """(training indices, loss changes) of the k examples whose removal would raise the query's loss most: those
        that pushed the prediction toward its target."""
        order = torch.argsort(self.loss_change[query], descending=True, stable=True)[:k]
        return self.train_indices[order], self.loss_change[query, order]

    def opponents(self, query: int, k: int = 10) -> tuple[Tensor, Tensor]:
        """(training indices, loss changes) of the k examples whose removal would lower the query's loss most."""
        order = torch.argsort(self.loss_change[query], stable=True)[:k]
        return self.train_indices[order], self.loss_change[query, order]


def _predicted(lossf: Loss, logits: Tensor) -> Tensor:
    if lossf.name == "cross_entropy":
        return logits.argmax(1)
    if lossf.name == "binary_logistic":
        return (logits[:, 0] > 0).to(logits.dtype)
    raise ValueError(f"the {lossf.name} loss has no predicted label: pass the queries' targets")


def influence_form(form: str, cov) -> str:
    """The concrete form an influence query uses for ``form`` ("auto": see ``influence``)."""
    if form == "auto":
        return "corrected" if default_form(cov) == "corrected" else "first_order"
    return resolve_form(form, cov)


def influence(model: nn.Module, queries: Tensor, train_data, variance, loss: str | Loss = "cross_entropy", *,
              targets: Tensor | None = None, result: SensitivityResult | None = None, form: str = "auto",
              chunk_size: int = 256, max_amplification: float | str | None = "auto",
              outputs: bool = True, fp32_precision: str = "bf16") -> InfluenceResult:
    """The change of each query's outputs and loss when each training example is removed.

    ``queries``: inputs (Q, ...); ``targets``: their labels (default: the predicted ones). ``train_data`` and
    ``variance`` as for ``compute_sensitivities`` (σ², a covariance object: diagonal, K-FAC, last-layer, dense);
    ``result``: that function's result on ``train_data`` with the same variance, if already computed (its ẽ_i are
    reused). The diagonal form has no ẽ; it gives first-order influence.

    ``form="auto"``: the form of ``result`` where one is given; else corrected with a dense covariance (exact
    there), first order with any other: an approximate covariance's own leverage on example i amplifies its errors
    into every query's change (docs/influence.md).

    ``outputs=False``: the loss change to first order in Δf*, e*ᵀ Δf* (e* the query's residual), without the
    output changes: one parameter vector per query instead of K, K times less work (bench/influence.py).

    ``fp32_precision``: the math of the float32 queries × gradients product on the CPU (torch's
    ``torch.backends.mkldnn.matmul.fp32_precision``): "bf16" lets oneDNN use the CPU's bfloat16 units where it has
    them (faster; its error against strict float32: bench/influence.py), "ieee" keeps strict float32. Other
    dtypes and devices are unaffected. The setting is torch's, process-wide, for the product's duration: pass
    "ieee" where other threads compute float32 products meanwhile.
    """
    if fp32_precision not in ("bf16", "ieee"):
        raise ValueError(f"fp32_precision must be 'bf16' or 'ieee', not {fp32_precision!r}")
    lossf = get_loss(loss)
    cov = as_covariance(model, variance)
    form = result.form if result is not None and form == "auto" else influence_form(form, cov)
    if result is not None and result.form != form:
        raise ValueError(f"the sensitivity result was computed in the {result.form} form, the query asks for {form}")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()
    try:  # the queries first: a bad target fails before the pass over the training data
        x_q = queries.to(device)
        with torch.no_grad():
            logits_q = torch.func.functional_call(model, {**dict(model.named_buffers()), **params}, (x_q,))
        if logits_q.ndim == 1:
            logits_q = logits_q[:, None]
        y_q = _predicted(lossf, logits_q) if targets is None else targets.to(device)
        lossf.check_targets(logits_q, y_q)
        if result is None and form != "first_order":  # first order: ẽ_i = e_i, from each chunk's own forward pass
            result = compute_sensitivities(model, train_data, cov, lossf, form=form, chunk_size=chunk_size,
                                           max_amplification=resolve_amplification(max_amplification, cov))
        if result is not None and result.corrected_residuals is None:
            raise ValueError("the sensitivity result has no corrected residuals; compute it with this version")
        k = logits_q.shape[1]
        weights = None if outputs else lossf.residual(logits_q, y_q)  # the loss's gradient in f*
        grads = _Gradients(model, params)
        rows = _query_rows(model, params, cov, x_q, k, weights, grads)
        changes = [_chunk_changes(grads, rows, k if outputs else 1, xs, ys, idx, result, lossf, fp32_precision)
                   for xs, ys, idx in iter_chunks(train_data, chunk_size, model)]
    finally:
        model.train(was_training)
    idx = torch.cat([c[0] for c in changes]) if changes else torch.empty(0, dtype=torch.long)
    dout = torch.cat([c[1] for c in changes], 1) if changes else logits_q.new_zeros(len(x_q), 0, k if outputs else 1)
    if not outputs:
        return InfluenceResult(train_indices=idx, query_logits=logits_q.cpu(), query_targets=y_q.cpu(),
                               output_change=None, loss_change=dout[:, :, 0].cpu(), form=form)
    q, n, _ = dout.shape
    base = lossf.value(logits_q, y_q)
    moved = lossf.value((logits_q[:, None, :] + dout).reshape(q * n, k), y_q.repeat_interleave(n, 0))
    return InfluenceResult(train_indices=idx, query_logits=logits_q.cpu(), query_targets=y_q.cpu(),
                           output_change=dout.cpu(), loss_change=(moved.reshape(q, n) - base[:, None]).cpu(), form=form)


def _query_rows(model: nn.Module, params: dict[str, Tensor], cov, x_q: Tensor, k: int,
                weights: Tensor | None, grads: _Gradients) -> Tensor:
    """Σ J*ᵀ for every query and output, flattened over the parameters: (Q·K, P); with ``weights`` (Q, K), Σ J*ᵀ w
    per query: (Q, P)."""
    size = sum(p.numel() for p in params.values())
    per = max(1, QUERY_BUDGET // max(1, k * size))
    rows = []
    for s in range(0, len(x_q), per):
        if weights is None:
            _, jac = per_example_jacobians(model, params, x_q[s : s + per])
            applied = cov.apply(jac)
            rows.append(torch.cat([applied[n].flatten(2) for n in params], 2).flatten(0, 1))
        else:
            applied = cov.apply(grads(x_q[s : s + per], weights[s : s + per]))
            rows.append(torch.cat([applied[n].flatten(1) for n in params], 1))
    return torch.cat(rows)


class _Gradients:
    """J_iᵀ w_i per example: name → (B, *shape), for ``w`` (B, K) or a function of the logits giving it. Linear,
    Conv2d and normalization layers' from one batched backward pass (layerwise), any other parameter's by a
    per-example VJP. The model's layers are walked once per query; a layer applied twice per example sends every
    later batch to the generic route at once."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]):
        self.model, self.params = model, params
        self.blocks = layerwise.gradient_blocks(model, params)

    def __call__(self, x: Tensor, w) -> dict[str, Tensor]:
        model, params = self.model, self.params
        grads: dict[str, Tensor] = {}
        if self.blocks:
            try:
                grads, w = layerwise.per_example_grads(model, self.blocks, x, w)
            except layerwise.Reused:  # a layer applied twice per example: the generic route for all, from now on
                grads, self.blocks = {}, []
        if callable(w):
            with torch.no_grad():
                w = w(torch.func.functional_call(model, {**dict(model.named_buffers()), **params}, (x,)))
        rest = {n: p for n, p in params.items() if n not in grads}
        if rest:
            f = functional(model, rest)

            def pull(xi, wi):
                _, back = vjp(lambda p: f(p, xi), rest)
                return back(wi)[0]

            grads.update(vmap(pull)(x, w))
        return {n: grads[n].detach() for n in params}


def _chunk_changes(grads: _Gradients, rows: Tensor, per_query: int, x: Tensor, y: Tensor, idx: Tensor,
                   result: SensitivityResult | None, lossf: Loss, precision: str) -> tuple[Tensor, Tensor]:
    """(indices, Δf* (Q, B, K), or e*ᵀ Δf* (Q, B, 1) with one row per query) for one chunk of training examples;
    ẽ_i from ``result``, or without one (first order) the residuals e_i."""
    if result is None:  # e_i from the logits of the pass that forms the gradients

        def residual(logits: Tensor) -> Tensor:
            logits = logits[:, None] if logits.ndim == 1 else logits
            return lossf.residual(logits, y.to(x.device)).to(rows.dtype)

        return idx, _changes(grads, rows, per_query, x, residual, precision)
    order = torch.argsort(result.indices)
    known = result.indices[order]
    at = torch.searchsorted(known, idx).clamp(max=max(len(known) - 1, 0))
    if len(known) == 0 or not bool((known[at] == idx).all()):
        raise ValueError("the sensitivity result does not cover every training example (compute it on train_data)")
    return idx, _changes(grads, rows, per_query, x, result.corrected_residuals[order[at]].to(x.device, rows.dtype),
                         precision)


def _changes(grads: _Gradients, rows: Tensor, per_query: int, x: Tensor, corrected, precision: str) -> Tensor:
    per = grads(x, corrected)  # J_iᵀ ẽ_i per example
    out, at = None, 0
    with _cpu_fp32_math(precision):  # one product per parameter: no (B, P) copy of the gradients
        for n in grads.params:
            g = per[n].flatten(1)
            r = rows[:, at : at + g.shape[1]]
            at += g.shape[1]
            out = r @ g.T if out is None else out.addmm_(r, g.T)
    return out.reshape(-1, per_query, len(x)).transpose(1, 2)  # (Q, B, K or 1)


@contextlib.contextmanager
def _cpu_fp32_math(precision: str):
    setting = torch.backends.mkldnn.matmul
    before = setting.fp32_precision
    setting.fp32_precision = precision
    try:
        yield
    finally:
        setting.fp32_precision = before
