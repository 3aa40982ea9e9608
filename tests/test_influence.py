"""Influence of training examples on queries: exact against a naive Jacobian reference (float64, each form and
covariance), and faithful to retraining without each example on a small convex model."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from sensitivity import DenseCovariance, DiagonalCovariance, KFACCovariance, compute_sensitivities, influence
from sensitivity.influence import influence_form
from sensitivity.retrain import fit_map
from sensitivity.variance import as_covariance

D = torch.float64  # every tensor here: the reference is exact to 1e-10


def _setup(n=24, q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    xq = torch.randn(q, 3, generator=g, dtype=torch.float64)
    return model, x, y, xq


def _flat_jacobian(model, x):
    """J (B, K, P) over the trainable parameters, in named_parameters order."""
    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(flat):
        parts, pos = {}, 0
        for n in names:
            k = params[n].numel()
            parts[n] = flat[pos : pos + k].reshape(params[n].shape)
            pos += k
        return functional_call(model, parts, (x,))

    flat = torch.cat([params[n].flatten() for n in names])
    return jacrev(f)(flat)


def _dense(model, cov):
    """Σ as a matrix, by applying the covariance to the basis."""
    named = {n: p for n, p in model.named_parameters()}
    size = sum(p.numel() for p in named.values())
    eye = torch.eye(size, dtype=D)
    tangents, pos = {}, 0
    for n, p in named.items():
        tangents[n] = eye[:, pos : pos + p.numel()].reshape(size, *p.shape)
        pos += p.numel()
    out = cov.apply(tangents)
    return torch.cat([out[n].reshape(size, -1) for n in named], 1)


def _corrected(form, e, lam, v):
    if form == "first_order":
        return e
    if form == "corrected":
        return torch.linalg.solve(torch.eye(len(e), dtype=D) - lam @ v, e)
    if form == "second_order":
        return e + lam @ v @ e
    u = lam @ v @ e  # rayleigh
    d = (u @ v @ u) / (u @ v @ e)
    return e + u / (1 - d)


def _covariances(model, x, y):
    sizes = [p.numel() for p in model.parameters()]
    g = torch.Generator().manual_seed(5)
    a = torch.randn(sum(sizes), sum(sizes), generator=g, dtype=torch.float64)
    return {
        "diagonal": DiagonalCovariance({n: 0.05 + 0.1 * torch.rand(p.shape, generator=g, dtype=torch.float64)
                                        for n, p in model.named_parameters()}),
        "dense": DenseCovariance(model, 0.01 * (a @ a.T) / sum(sizes) + 0.01 * torch.eye(sum(sizes), dtype=D)),
        "kfac": KFACCovariance.fit(model, (x, y), prior_precision=2.0, mc_samples=None),
        "last_layer": DenseCovariance.last_layer(model, (x, y), prior_precision=2.0),
    }


@pytest.mark.parametrize("form", ["first_order", "corrected", "second_order", "rayleigh"])
@pytest.mark.parametrize("kind", ["diagonal", "dense", "kfac", "last_layer"])
def test_influence_matches_a_naive_jacobian_reference(kind, form):
    model, x, y, xq = _setup()
    cov = _covariances(model, x, y)[kind]
    res = influence(model, xq, (x, y), cov, form=form, chunk_size=7, max_amplification=1e6)
    sigma = _dense(model, cov)
    jx, jq = _flat_jacobian(model, x), _flat_jacobian(model, xq)
    with torch.no_grad():
        fx, fq = model(x), model(xq)
    p = fx.softmax(-1)
    e = p - nn.functional.one_hot(y, 3)
    expect = torch.zeros(len(xq), len(x), 3, dtype=D)
    for i in range(len(x)):
        lam = torch.diag(p[i]) - torch.outer(p[i], p[i])
        v = jx[i] @ sigma @ jx[i].T
        expect[:, i] = torch.einsum("qkp,pr,r->qk", jq, sigma, jx[i].T @ _corrected(form, e[i], lam, v))
    assert torch.equal(res.train_indices, torch.arange(len(x)))
    assert torch.allclose(res.output_change, expect, atol=1e-10, rtol=1e-8)
    yq = fq.argmax(1)  # the predicted labels by default
    moved = nn.functional.cross_entropy((fq[:, None] + expect).reshape(-1, 3), yq.repeat_interleave(len(x)),
                                        reduction="none").reshape(len(xq), len(x))
    base = nn.functional.cross_entropy(fq, yq, reduction="none")
    assert torch.allclose(res.loss_change, moved - base[:, None], atol=1e-10, rtol=1e-8)


def test_proponents_and_opponents_rank_the_loss_change_and_inputs_are_checked():
    model, x, y, xq = _setup()
    cov = _covariances(model, x, y)["diagonal"]
    res = influence(model, xq, (x, y, torch.arange(100, 124)), cov, targets=torch.tensor([0, 1, 2, 0, 1]))
    idx, change = res.proponents(2, k=4)
    assert (change[:-1] >= change[1:]).all() and set(idx.tolist()) <= set(range(100, 124))
    assert float(change[0]) == float(res.loss_change[2].max())
    idx, change = res.opponents(2, k=4)
    assert float(change[0]) == float(res.loss_change[2].min())
    with pytest.raises(ValueError, match="targets"):
        influence(model, xq, (x, y), cov, targets=torch.tensor([0, 1]))


def test_the_loss_change_follows_retraining_without_each_example():
    """Logistic regression at its MAP with the exact Laplace covariance: predicted vs refitted query losses."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=D)
    w = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 2.0, -0.5], [0.0, -1.0, 1.5]], dtype=D)
    y = (x @ w.T + 0.8 * torch.randn(40, 3, generator=g, dtype=D)).argmax(1)  # noisy labels: some examples oppose
    xq = torch.randn(4, 3, generator=g, dtype=D)
    torch.manual_seed(0)
    model = fit_map(nn.Linear(3, 3).double(), x, y, prior_precision=1.0)
    cov = DenseCovariance.laplace(model, (x, y), prior_precision=1.0)
    res = influence(model, xq, (x, y), cov, form="corrected")
    with torch.no_grad():
        yq = model(xq).argmax(1)
        base = nn.functional.cross_entropy(model(xq), yq, reduction="none")
    actual = torch.zeros(4, 40, dtype=D)
    for i in range(40):
        keep = torch.arange(40) != i
        refit = fit_map(copy.deepcopy(model), x[keep], y[keep], prior_precision=1.0)
        with torch.no_grad():
            actual[:, i] = nn.functional.cross_entropy(refit(xq), yq, reduction="none") - base
    r = np.corrcoef(res.loss_change.flatten().numpy(), actual.flatten().numpy())[0, 1]
    assert r >= 0.9, r
    for q in range(4):  # the top proponent's removal raises the query's loss at least as much as the median's
        top = int(res.proponents(q, k=1)[0])
        assert actual[q, top] >= actual[q].median()


def test_auto_is_corrected_with_a_dense_covariance_and_first_order_with_an_approximate_one():
    model, x, y, xq = _setup()
    covs = _covariances(model, x, y)
    for kind, cov in covs.items():
        want = "corrected" if isinstance(cov, DenseCovariance) else "first_order"
        assert influence_form("auto", as_covariance(model, cov)) == want, kind
        auto = influence(model, xq, (x, y), cov)
        explicit = influence(model, xq, (x, y), cov, form=want)
        assert auto.form == want and torch.equal(auto.loss_change, explicit.loss_change)
    with pytest.raises(ValueError, match="Invalid form"):
        influence_form("newton", as_covariance(model, covs["diagonal"]))


def test_without_outputs_the_loss_change_is_first_order_in_the_output_change():
    model, x, y, xq = _setup()
    cov = _covariances(model, x, y)["kfac"]
    full = influence(model, xq, (x, y), cov, form="rayleigh")
    lean = influence(model, xq, (x, y), cov, form="rayleigh", outputs=False, chunk_size=5)
    with torch.no_grad():
        fq = model(xq)
    e = fq.softmax(-1) - nn.functional.one_hot(fq.argmax(1), 3)
    assert lean.output_change is None
    assert torch.allclose(lean.loss_change, torch.einsum("qnk,qk->qn", full.output_change, e), atol=1e-10, rtol=1e-8)


def test_float32_queries_at_bf16_math_agree_with_strict_float32_and_leave_the_setting_as_it_was():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y, xq = torch.randn(300, 16), torch.randint(0, 10, (300,)), torch.randn(20, 16)
    var = {n: torch.rand_like(p) * 1e-2 for n, p in model.named_parameters()}
    before = torch.backends.mkldnn.matmul.fp32_precision
    fast = influence(model, xq, (x, y), var, chunk_size=64)
    strict = influence(model, xq, (x, y), var, chunk_size=64, fp32_precision="ieee")
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    scale = strict.output_change.abs().amax((1, 2), keepdim=True)
    # on a CPU with bfloat16 units the product runs at bfloat16's precision (a few parts in a thousand of a query's
    # largest change); elsewhere it is strict float32's
    assert ((fast.output_change - strict.output_change).abs() / scale).max() < 1e-2
    shared = [len(set(fast.proponents(q)[0].tolist()) & set(strict.proponents(q)[0].tolist())) for q in range(20)]
    assert sum(shared) >= 0.95 * 20 * len(fast.proponents(0)[0])
    with pytest.raises(ValueError, match="fp32_precision must be 'bf16' or 'ieee'"):
        influence(model, xq, (x, y), var, fp32_precision="tf32")


def test_a_result_that_does_not_cover_the_training_data_is_refused():
    model, x, y, xq = _setup()
    cov = _covariances(model, x, y)["diagonal"]
    partial = compute_sensitivities(model, (x[:10], y[:10]), cov, form="first_order")
    with pytest.raises(ValueError, match="does not cover every training example"):
        influence(model, xq, (x, y), cov, result=partial)
    other_form = compute_sensitivities(model, (x, y), cov, form="rayleigh")
    with pytest.raises(ValueError, match="computed in the rayleigh form, the query asks for first_order"):
        influence(model, xq, (x, y), cov, result=other_form, form="first_order")
    assert influence(model, xq, (x, y), cov, result=other_form).form == "rayleigh"  # auto: the result's form
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        influence(frozen, xq, (x, y), cov)
    with pytest.raises(ValueError, match="no predicted label"):
        influence(model, xq, (x, y.double()[:, None].expand(-1, 3).contiguous()), cov, loss="squared_error")


def test_the_influence_study_runs_end_to_end_on_a_small_instance():
    from research.influence import COVARIANCES, faithfulness, report

    rows, removal, info = faithfulness(n_train=30, n_queries=2, seeds=(0,))
    assert [r["covariance"] for r in rows] == list(COVARIANCES)
    assert all(-1.0 <= r["pearson_min"] <= r["pearson"] <= r["pearson_max"] <= 1.0 for r in rows)
    assert {r["chooser"] for r in removal} >= {"influence, dense Laplace", "random"}
    text = report(rows, removal, info, 1.0)
    assert "| dense Laplace (exact GGN), corrected |" in text and "of 2 |" in text


class _Scaled(nn.Module):
    """A parameter no layer owns (the generic route) after a conv, a GroupNorm and a linear head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 5 * 5, 3))
        self.scale = nn.Parameter(torch.tensor([1.3, 0.7, 1.1]))

    def forward(self, x):
        return self.body(x) * self.scale


class _Twice(nn.Module):
    """One Linear applied twice per example: no per-layer route."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("make, shape", [(_Scaled, (2, 5, 5)), (_Twice, (3,))])
def test_per_example_gradients_by_layer_match_per_example_vjps(make, shape):
    from torch.func import vjp, vmap

    from sensitivity.influence import _Gradients
    from sensitivity.jacobians import functional

    torch.manual_seed(0)
    model = make().double().eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, w = torch.randn(6, *shape, dtype=D), torch.randn(6, 3, dtype=D)
    f = functional(model, params)
    expect = vmap(lambda xi, wi: vjp(lambda p: f(p, xi), params)[1](wi)[0])(x, w)
    from sensitivity import layerwise

    assert len(layerwise.gradient_blocks(model, params)) == (3 if make is _Scaled else 2)  # conv, norm, linear
    grads = _Gradients(model, params)
    for _ in range(2):  # a second batch: after a layer reused, straight to the generic route
        got = grads(x, w)
        assert list(got) == list(params)
        for n in params:
            torch.testing.assert_close(got[n], expect[n], rtol=1e-10, atol=1e-12)
    assert (grads.blocks == []) == (make is _Twice)
