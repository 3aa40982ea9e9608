"""The deviation forms against a naive vmap(jacrev) reference, float64, MLP and CNN; covariances."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from sensitivity import DiagonalCovariance, compute_sensitivities, iter_sensitivities
from sensitivity.covariance import BlockCovariance, DenseCovariance, KFACCovariance, last_layer_params


def _naive(model, x, y, sigma_dense):
    """V_i = J_i Σ J_iᵀ from materialized Jacobians; Δ in each form (unguarded)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(p, xi):
        return functional_call(model, (p, buffers), (xi[None],))[0]

    jac = vmap(jacrev(f), (None, 0))(params, x)
    j = torch.cat([jac[n].reshape(len(x), jac[n].shape[1], -1) for n in params], 2)
    v = j @ sigma_dense @ j.transpose(1, 2)
    logits = vmap(f, (None, 0))(params, x)
    p = logits.softmax(-1)
    e = p - nn.functional.one_hot(y, p.shape[1])
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    eye = torch.eye(p.shape[1], dtype=v.dtype)
    ve = v @ e[:, :, None]
    u = lam @ ve
    vu = v @ u
    d = (u.transpose(1, 2) @ vu) / (u.transpose(1, 2) @ ve)
    return {
        "rayleigh": (ve + vu / (1.0 - d))[:, :, 0],
        "first_order": (v @ e[:, :, None])[:, :, 0],
        "corrected": (v @ torch.linalg.solve(eye - lam @ v, e[:, :, None]))[:, :, 0],
        "second_order": (v @ (e[:, :, None] + lam @ v @ e[:, :, None]))[:, :, 0],
        "diagonal": torch.diagonal(v, dim1=1, dim2=2) * e,
    }


def _mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make,shape", [(_mlp, (5,)), (_cnn, (2, 6, 6))])
@pytest.mark.parametrize("form", ["first_order", "corrected", "second_order", "rayleigh", "diagonal"])
def test_forms_match_naive_jacobian_reference_in_float64(make, shape, form, device):
    model = make()
    x = torch.randn(25, *shape, dtype=torch.float64)
    y = torch.randint(0, 4, (25,))
    var = [torch.rand_like(p) * 0.05 for p in model.parameters()]
    ref = _naive(model, x, y, torch.diag(torch.cat([v.flatten() for v in var])))[form]
    model.to(device)  # the data stays on the CPU: chunks move to the model's device
    res = compute_sensitivities(model, (x, y), [v.to(device) for v in var], form=form, chunk_size=6,
                                max_amplification=1e15)
    assert (res.deviations - ref).abs().max() <= 1e-10
    assert torch.equal(res.indices, torch.arange(25))


def test_dense_covariance_matches_naive_with_correlations():
    model = _mlp()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 4, (20,))
    p = sum(q.numel() for q in model.parameters())
    a = torch.randn(p, p, dtype=torch.float64) * 0.02
    sigma = a @ a.T + 0.01 * torch.eye(p, dtype=torch.float64)
    ref = _naive(model, x, y, sigma)
    for form in ("first_order", "corrected", "second_order", "rayleigh"):
        res = compute_sensitivities(model, (x, y), DenseCovariance(model, sigma), form=form, max_amplification=1e15)
        assert (res.deviations - ref[form]).abs().max() <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_kfac_with_exact_factors_is_exact_for_one_example(device):
    """With one example, A ⊗ G = a aᵀ ⊗ Σ_k b_k b_kᵀ is the exact GGN, for Linear and Conv2d layers."""
    for model, x in [(nn.Sequential(nn.Linear(4, 3)).double().to(device), torch.randn(1, 4, dtype=torch.float64)),
                     (nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()).double().to(device),
                      torch.randn(1, 2, 3, 3, dtype=torch.float64))]:
        y = torch.tensor([1])
        kfac = KFACCovariance.fit(model, (x, y), prior_precision=0.7, mc_samples=None)
        dense = DenseCovariance.laplace(model, (x, y), prior_precision=0.7)
        t = {n: torch.randn(5, *p.shape, dtype=torch.float64, device=p.device) for n, p in model.named_parameters()}
        a, b = kfac.apply(t), dense.apply(t)
        for n in t:
            assert torch.allclose(a[n], b[n], atol=1e-10), n


def _kfac_precision(layer: dict) -> torch.Tensor:
    """The layer's K-FAC precision A ⊗ G + prior I, ordered like vec of the (out, in [+ bias]) matrix, row-major."""
    a = layer["qa"] @ torch.diag(layer["la"]) @ layer["qa"].T
    g = layer["qg"] @ torch.diag(layer["lg"]) @ layer["qg"].T
    return torch.kron(g, a) + layer["prior"] * torch.eye(len(a) * len(g), dtype=a.dtype)


def test_kfac_reduce_equals_expand_at_one_position_and_is_exact_for_the_bias():
    torch.manual_seed(0)
    one = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()).double()  # a 3×3 input: one output position
    x1, y1 = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    exp = KFACCovariance.fit(one, (x1, y1), prior_precision=0.5, mc_samples=None)
    red = KFACCovariance.fit(one, (x1, y1), prior_precision=0.5, mc_samples=None, conv="reduce")
    assert torch.allclose(_kfac_precision(exp.layers["0"]), _kfac_precision(red.layers["0"]), atol=1e-10)

    # Many positions, one example: the bias gradient is Σ_t b_t, which reduce keeps exactly and expand does not.
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    x, y = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.tensor([1])
    exact = torch.linalg.inv(DenseCovariance.laplace(conv, (x, y), prior_precision=0.5).sigma)
    bias_exact = exact[-2:, -2:]  # parameters in order: weight (2·2·3·3), bias (2)
    per_row = 2 * 3 * 3 + 1  # the bias is the last input column of each output row
    rows = [per_row * k + per_row - 1 for k in range(2)]
    fits = {m: KFACCovariance.fit(conv, (x, y), prior_precision=0.5, mc_samples=None, conv=m)
            for m in ("reduce", "expand")}
    bias = {m: _kfac_precision(f.layers["0"])[rows][:, rows] for m, f in fits.items()}
    assert torch.allclose(bias["reduce"], bias_exact, atol=1e-10)
    assert not torch.allclose(bias["expand"], bias_exact, atol=1e-6)
    with pytest.raises(ValueError, match="conv"):
        KFACCovariance.fit(conv, (x, y), conv="sideways")


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (5, 1, 2, 2),
                                                             ((3, 1), (2, 1), (1, 0), 1)])
def test_reduce_patch_means_equal_unfolded_means(kernel, stride, padding, dilation):
    from torch.nn import functional as F

    from sensitivity.conv_factors import patch_means as _patch_means

    conv = nn.Conv2d(4, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    a = torch.randn(3, 4, 11, 12, dtype=torch.float64)
    ref = F.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride).mean(2)
    assert torch.allclose(_patch_means(conv, a), ref, atol=1e-12)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "same"])
def test_kfac_factors_read_the_padding_the_layer_applies(mode):
    """Padding modes and string padding: K-FAC's factors come from the patches the layer reads (zeros were used
    before, for every mode), for both conv treatments."""
    from torch.nn import functional as F

    from sensitivity.conv_factors import patch_means

    torch.manual_seed(0)
    kw = dict(padding="same") if mode == "same" else dict(padding=(1, 2), padding_mode=mode)
    conv = nn.Conv2d(4, 3, (3, 5), **kw).double()  # 4 channels: the shifted route
    a = torch.randn(4, 4, 6, 7, dtype=torch.float64)
    padded = F.pad(a, (2, 2, 1, 1), mode="constant" if mode == "same" else mode)
    u = F.unfold(padded, conv.kernel_size)
    with torch.no_grad():
        torch.testing.assert_close(conv(a).flatten(2), conv.weight.flatten(1) @ u + conv.bias[:, None], rtol=0,
                                   atol=1e-12)
    torch.testing.assert_close(patch_means(conv, a), u.mean(2), rtol=0, atol=1e-12)
    rows = torch.cat([u.transpose(1, 2).reshape(-1, u.shape[1]), torch.ones(u.shape[0] * u.shape[2], 1,
                                                                             dtype=u.dtype)], 1)
    fit = KFACCovariance.fit(nn.Sequential(conv, nn.Flatten()), (a, torch.zeros(4, dtype=torch.long)),
                             prior_precision=1.0)
    f = fit.layers["0"]
    a_fit = f["qa"] @ torch.diag(f["la"]) @ f["qa"].T
    torch.testing.assert_close(a_fit, rows.T @ rows / rows.shape[0], rtol=0, atol=1e-10)


def test_last_layer_laplace_covers_the_head_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    assert last_layer_params(model) == ["2.weight", "2.bias"]
    ll = DenseCovariance.last_layer(model, (x, y), prior_precision=2.0)
    ref = DenseCovariance.laplace(model, (x, y), prior_precision=2.0, params=["2.weight", "2.bias"])
    assert torch.allclose(ll.sigma, ref.sigma) and ll.sigma.shape == (21, 21)
    res = compute_sensitivities(model, (x, y), ll)  # "auto": corrected, with the body fixed
    assert res.form == "corrected" and torch.isfinite(res.loo_losses).all()
    with pytest.raises(ValueError, match="no nn.Linear"):
        last_layer_params(nn.Sequential(nn.Conv2d(1, 2, 3)))


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(5, 6), nn.Tanh()), nn.Linear(6, 3)

    def forward(self, x):
        return 2.0 * self.head(self.body(x))  # an op after the head: the generic route


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)),
                                  lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3, bias=False)),
                                  _Scaled])
def test_last_layer_shortcut_equals_per_example_jacobians(make):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    names = last_layer_params(model)
    fast = DenseCovariance.last_layer(model, (x, y), prior_precision=2.0, chunk_size=16)
    ref = DenseCovariance.laplace(model, (x, y), prior_precision=2.0, params=names)
    assert fast.names == names and (fast.sigma - ref.sigma).abs().max() <= 1e-10
    from sensitivity.covariance import _linear_head_ggn
    from sensitivity.losses import get_loss

    took_shortcut = _linear_head_ggn(model, (x, y), get_loss("cross_entropy"), 16, names) is not None
    assert took_shortcut == (make is not _Scaled)


def test_block_covariance_equals_the_dense_block_diagonal():
    model = _mlp()
    x, y = torch.randn(15, 5, dtype=torch.float64), torch.randint(0, 4, (15,))
    head = DenseCovariance.last_layer(model, (x, y), prior_precision=3.0)
    body = [n for n, _ in model.named_parameters() if n not in head.names]
    named = dict(model.named_parameters())
    var = {n: torch.rand_like(named[n]) * 0.05 for n in body}
    block = BlockCovariance([DiagonalCovariance(var), head], [body, head.names])
    assert block.covers == BlockCovariance.with_last_layer(model, DiagonalCovariance(var), head).covers
    full = torch.block_diag(torch.diag(torch.cat([var[n].flatten() for n in body])), head.sigma)
    dense = DenseCovariance(model, full)  # parameter order: body first, then the head
    for form in ("first_order", "corrected"):
        a = compute_sensitivities(model, (x, y), block, form=form)
        b = compute_sensitivities(model, (x, y), dense, form=form)
        assert (a.deviations - b.deviations).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="two blocks"):
        BlockCovariance([head, head], [head.names, head.names])
    with pytest.raises(ValueError, match="one list of parameter names per block"):
        BlockCovariance([head], [])


def test_kfac_monte_carlo_factors_approach_exact_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    x, y = torch.randn(400, 6, dtype=torch.float64), torch.randint(0, 3, (400,))
    exact = KFACCovariance.fit(model, (x, y), prior_precision=1.0, mc_samples=None)
    mc = KFACCovariance.fit(model, (x, y), prior_precision=1.0, mc_samples=20)
    g_exact, g_mc = exact.layers["2"]["lg"], mc.layers["2"]["lg"]
    assert torch.allclose(g_mc, g_exact, rtol=0.15)


def test_streaming_matches_one_pass_and_bad_chunk_size():
    model = _mlp()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 4, (30,))
    var = DiagonalCovariance({n: torch.full_like(p, 0.1) for n, p in model.named_parameters()})
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, torch.arange(100, 130)), batch_size=8)
    parts = list(iter_sensitivities(model, loader, var, chunk_size=3))
    assert len(parts) == 11  # loader batches 8, 8, 8, 6 in chunks of 3
    whole = compute_sensitivities(model, (x, y), var)
    streamed = torch.cat([p.deviations for p in parts])
    assert torch.allclose(streamed, whole.deviations, atol=1e-12)
    assert torch.equal(torch.cat([p.indices for p in parts]), torch.arange(100, 130))
    with pytest.raises(ValueError, match="chunk_size"):
        compute_sensitivities(model, (x, y), var, chunk_size=0)


def test_guard_flags_exactly_the_examples_whose_spectrum_reaches_the_cap():
    model = _mlp()
    x, y = torch.randn(40, 5, dtype=torch.float64) * 3, torch.randint(0, 4, (40,))
    # eigenvalues of Λ_i V_i (σ² = 1) from materialized Jacobians; they scale linearly with σ²
    params = {n: p.detach() for n, p in model.named_parameters()}
    j = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), (None, 0))(params, x)
    j = torch.cat([j[n].reshape(40, 4, -1) for n in params], 2)
    prob = model(x).detach().softmax(-1)
    lam = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    top = torch.linalg.eigvals(lam @ j @ j.transpose(1, 2)).real.max(1).values
    srt = top.sort().values
    scale = 0.9 / float(0.5 * (srt[19] + srt[20]))  # half of the examples reach the cap of 1 − 1/10
    var = [torch.full_like(p, scale) for p in model.parameters()]
    res = compute_sensitivities(model, (x, y), var, form="corrected", max_amplification=10.0)
    assert res.guarded.any() and not res.guarded.all()
    assert torch.equal(res.guarded, top * scale > 0.9)
    assert torch.isfinite(res.deviations).all()
    exact = compute_sensitivities(model, (x, y), var, form="corrected", max_amplification=1e15)
    ok = ~res.guarded
    assert torch.allclose(res.deviations[ok], exact.deviations[ok], atol=1e-10)


def test_second_order_guard_caps_the_correction_at_the_amplification_and_flags_those_examples():
    model = _mlp()
    x, y = torch.randn(40, 5, dtype=torch.float64) * 3, torch.randint(0, 4, (40,))
    var = [torch.full_like(p, 0.5) for p in model.parameters()]
    ref = _naive(model, x, y, 0.5 * torch.eye(sum(p.numel() for p in model.parameters()), dtype=torch.float64))
    first = compute_sensitivities(model, (x, y), var, form="first_order")
    e = first.residuals
    # c = ΛVe, recovered from the unguarded second-order and first-order deviations' inputs
    p = model(x).detach().softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    c = (lam @ first.deviations[:, :, None])[:, :, 0]
    ratio = c.norm(dim=1) / e.norm(dim=1)
    cap = float(ratio.median()) + 1.0  # about half of the examples need the guard
    res = compute_sensitivities(model, (x, y), var, form="second_order", max_amplification=cap)
    assert torch.equal(res.guarded, ratio > cap - 1.0) and res.guarded.any() and not res.guarded.all()
    ok = ~res.guarded
    assert (res.deviations[ok] - ref["second_order"][ok]).abs().max() <= 1e-10
    # guarded: Δ = V e + V c·s with s = (cap − 1)‖e‖ / ‖c‖, i.e. between the first order and the unguarded form
    s = ((cap - 1.0) / ratio[res.guarded])[:, None]
    want = first.deviations[res.guarded] + s * (ref["second_order"][res.guarded] - first.deviations[res.guarded])
    assert (res.deviations[res.guarded] - want).abs().max() <= 1e-10


@pytest.mark.parametrize("loss,k", [("cross_entropy", 2), ("binary_logistic", 1)])
@pytest.mark.parametrize("var,cap", [(0.05, 1e15), (0.3, 3.0)])
def test_rayleigh_equals_the_corrected_form_where_the_hessian_has_rank_one(loss, k, var, cap):
    # Λ of rank one: ΛV has one nonzero eigenvalue, u lies along its eigenvector, and the series is geometric
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, k)).double()
    x = torch.randn(60, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 2, (60,)) if loss == "cross_entropy" else torch.randint(0, 2, (60,)).double()
    var = [torch.full_like(p, var) for p in model.parameters()]
    ray = compute_sensitivities(model, (x, y), var, loss, form="rayleigh", max_amplification=cap)
    cor = compute_sensitivities(model, (x, y), var, loss, form="corrected", max_amplification=cap)
    assert (ray.deviations - cor.deviations).abs().max() <= 1e-10 * max(1.0, float(cor.deviations.abs().max()))
    assert torch.equal(ray.guarded, cor.guarded)
    # unguarded at the huge cap; at cap 3 the large variance makes the cap bind for some examples, not all
    assert not ray.guarded.any() if cap > 10 else (ray.guarded.any() and not ray.guarded.all())


def test_rayleigh_lies_between_the_first_order_and_the_corrected_form_along_u():
    # with K = 4 the Rayleigh quotient d ≤ λ_max(ΛV): the geometric tail is a lower estimate of the exact one here
    model = _mlp()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 4, (40,))
    var = [torch.full_like(p, 0.2) for p in model.parameters()]
    forms = {f: compute_sensitivities(model, (x, y), var, form=f, max_amplification=1e15).loo
             for f in ("first_order", "second_order", "rayleigh", "corrected")}
    assert forms["first_order"] < forms["second_order"] <= forms["rayleigh"] <= forms["corrected"]


class _Shared(nn.Module):
    """One Linear layer applied twice: not rank one, must fall back to the generic route."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


@pytest.mark.parametrize("make,shape", [(_mlp, (5,)), (_cnn, (2, 6, 6)), (lambda: _Shared().double(), (5,))])
@pytest.mark.parametrize("form", ["first_order", "corrected", "second_order", "rayleigh", "diagonal"])
@pytest.mark.parametrize("kind", ["diagonal", "kfac"])
def test_rank_one_linear_route_equals_generic_route(make, shape, form, kind):
    from sensitivity import layerwise

    model = make()
    x, y = torch.randn(12, *shape, dtype=torch.float64), torch.randint(0, 4, (12,))
    if kind == "kfac":
        var = KFACCovariance.fit(model, (x, y), prior_precision=3.0, mc_samples=None)
    else:
        var = [torch.rand_like(p) * 0.05 for p in model.parameters()]
    fast = compute_sensitivities(model, (x, y), var, form=form, fast=True)
    slow = compute_sensitivities(model, (x, y), var, form=form, fast=False)
    assert (fast.deviations - slow.deviations).abs().max() <= 1e-10
    cov = var if kind == "kfac" else DiagonalCovariance(dict(zip([n for n, _ in model.named_parameters()], var)))
    params = {n: p for n, p in model.named_parameters()}
    assert layerwise.eligible_blocks(model, cov, params)  # the fast route had Linear layers to take


def _convs_bn():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 2, dilation=2, bias=False), nn.GroupNorm(3, 3), nn.Tanh(),
                          nn.Flatten(), nn.Linear(12, 4)).double()
    bn = model[1]  # eval-mode statistics that are not the identity
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _resnet():
    from worker.models import resnet20

    torch.manual_seed(3)
    return resnet20(num_classes=4, in_channels=2).double()


def _layerwise_covariance(model, x, y, kind):
    """(what compute_sensitivities takes, the covariance the per-layer route sees) for one kind."""
    params = dict(model.named_parameters())
    if kind == "kfac":
        var = KFACCovariance.fit(model, (x, y), prior_precision=3.0, mc_samples=None)
        return var, var
    gen = torch.Generator().manual_seed(11)  # the same σ² on every device
    var = [torch.rand(p.shape, generator=gen, dtype=p.dtype).to(p.device) * 0.05 for p in model.parameters()]
    cov = DiagonalCovariance(dict(zip(params, var)))
    if kind == "block":  # IVON-like σ² for the body, an exact last-layer Laplace (dense, own layer) for the head
        head = DenseCovariance.last_layer(model, (x, y), prior_precision=3.0)
        var = cov = BlockCovariance.with_last_layer(model, cov, head)
    if kind == "head":  # the last-layer Laplace alone: the head per layer, the body (Σ = 0) generically
        var = cov = DenseCovariance.last_layer(model, (x, y), prior_precision=3.0)
    return var, cov


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make,shape", [(_convs_bn, (2, 7, 7)), (_resnet, (2, 8, 8))])
@pytest.mark.parametrize("form", ["first_order", "corrected", "second_order", "rayleigh"])
@pytest.mark.parametrize("kind", ["diagonal", "kfac", "block", "head"])
def test_layerwise_route_covers_convolutions_and_norms_exactly(make, shape, form, kind, device):
    from sensitivity import layerwise

    model = make()
    x, y = torch.randn(10, *shape, dtype=torch.float64), torch.randint(0, 4, (10,))
    if device != "cpu":  # the CPU's numbers first, then the same on the device: covariances fitted there
        reference = compute_sensitivities(model, (x, y), _layerwise_covariance(model, x, y, kind)[0], form=form,
                                          fast=False)
        model, x, y = model.to(device), x.to(device), y.to(device)
    var, cov = _layerwise_covariance(model, x, y, kind)
    params = dict(model.named_parameters())
    covered = {n for b in layerwise.eligible_blocks(model, cov, params) for n in b.params()}
    # every parameter on the per-layer route (no per-example vmap at all), or just the head
    assert covered == (set(cov.names) if kind == "head" else set(params))
    fast = compute_sensitivities(model, (x, y), var, form=form, fast=True)
    slow = compute_sensitivities(model, (x, y), var, form=form, fast=False)
    scale = slow.deviations.abs().max()
    assert scale > 0 and (fast.deviations - slow.deviations).abs().max() <= 1e-10 * max(1.0, float(scale))
    if device != "cpu":
        assert (fast.deviations - reference.deviations).abs().max() <= 1e-10 * max(1.0, float(scale))
        assert torch.allclose(fast.loo_losses, reference.loo_losses, rtol=1e-10, atol=1e-12)


class _InPlaceBlock(nn.Module):
    """A residual block that changes layer outputs in place, as torchvision's ResNets do."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.conv1, self.norm1 = nn.Conv2d(3, 3, 3, padding=1), nn.GroupNorm(3, 3)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2, self.norm2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.GroupNorm(1, 3)
        self.head = nn.Linear(3 * 16, 4)

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.inplace:
            out += x
            out = torch.relu_(out)
        else:
            out = torch.relu(out + x)
        return self.head(out.flatten(1))


@pytest.mark.parametrize("form", ["first_order", "corrected", "rayleigh"])
@pytest.mark.parametrize("kind", ["diagonal", "kfac"])
def test_in_place_operations_after_a_layer_change_nothing(form, kind):
    torch.manual_seed(4)
    x, y = torch.randn(7, 3, 4, 4, dtype=torch.float64), torch.randint(0, 4, (7,))
    out, counts = {}, {}
    for inplace in (False, True):
        torch.manual_seed(5)
        model = _InPlaceBlock(inplace).double()
        if kind == "kfac":
            var = KFACCovariance.fit(model, (x, y), prior_precision=3.0, mc_samples=None)
        else:
            var = [torch.rand_like(p) * 0.05 for p in model.parameters()]
        calls = []
        model.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        out[inplace] = [compute_sensitivities(model, (x, y), var, form=form, fast=fast, chunk_size=2).deviations
                        for fast in (True, False)]
        counts[inplace] = len(calls)
    assert counts[True] == counts[False] + 1  # the in-place changes seen once, not once per part
    ref = out[False][1]
    assert ref.abs().max() > 0
    for dev in (*out[True], out[False][0]):
        torch.testing.assert_close(dev, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["first_order", "rayleigh"])
def test_a_norm_layer_whose_input_has_no_tangent_keeps_its_own(form):
    """A frozen first layer: the GroupNorm after it is the first block, its input carries no tangent."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)).double()
    model[0].requires_grad_(False)
    x, y = torch.randn(5, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    var = {n: torch.rand_like(p) * 0.1 for n, p in model.named_parameters() if p.requires_grad}
    fast, slow = (compute_sensitivities(model, (x, y), var, form=form, fast=f).deviations for f in (True, False))
    assert slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_kfac_fit_reads_layer_outputs_before_in_place_changes():
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    fits = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(4, 4, 3, padding=1),
                              nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(100, 3)).double()
        fits.append(KFACCovariance.fit(model, (x, y), prior_precision=1.0, mc_samples=None, chunk_size=4))
    for name, layer in fits[0].layers.items():
        for key in ("la", "lg"):
            torch.testing.assert_close(fits[1].layers[name][key], layer[key], rtol=0, atol=1e-12)


def test_first_order_parts_on_a_cpu_follow_the_activation_budget_and_change_nothing(monkeypatch):
    import sensitivity.deviations as D

    model = _cnn()
    x, y = torch.randn(10, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    var = [torch.rand_like(p) * 0.05 for p in model.parameters()]
    whole = compute_sensitivities(model, (x, y), var, form="first_order", chunk_size=10)
    seen = []
    real = D._chunk

    def spy(plan, lossf, xs, *a):
        seen.append(len(xs))
        return real(plan, lossf, xs, *a)

    monkeypatch.setattr(D, "_chunk", spy)
    monkeypatch.setitem(D.ACTIVATION_BUDGET, "cpu", 3 * 3 * 6 * 6)  # 3 examples of the widest layer output (3x6x6)
    parts = compute_sensitivities(model, (x, y), var, form="first_order", chunk_size=10)
    assert seen == [3, 3, 3, 1]
    assert torch.allclose(parts.deviations, whole.deviations, rtol=0, atol=1e-12)
    assert torch.equal(parts.indices, whole.indices)


@pytest.mark.parametrize(("loss", "k"), [("cross_entropy", 7), ("binary_logistic", 1), ("squared_error", 3)])
def test_closed_form_hessian_product_equals_the_factor_route(loss, k):
    from sensitivity.losses import get_loss

    torch.manual_seed(0)
    lossf = get_loss(loss, noise_var=0.3)
    logits, v = torch.randn(11, k, dtype=torch.float64) * 3, torch.randn(11, k, dtype=torch.float64)
    factor = lossf.hessian_factor(logits)
    expected = (factor @ (factor.transpose(1, 2) @ v[:, :, None]))[:, :, 0]
    torch.testing.assert_close(lossf.hessian_product(logits, v), expected, rtol=0, atol=1e-13)


CONVS = [  # (kwargs, input H × W): stride 1 takes the shifted-correlation route, the rest unfolds
    (dict(kernel_size=3, padding=1), (8, 8)),
    (dict(kernel_size=3, padding=1), (2, 3)),  # every pixel a border pixel
    (dict(kernel_size=3, padding=0, dilation=2), (7, 9)),
    (dict(kernel_size=(3, 2), padding=(2, 0), dilation=(1, 3)), (6, 8)),
    (dict(kernel_size=5, padding=2), (5, 6)),
    (dict(kernel_size=3, padding=4), (4, 4)),  # padding beyond the kernel: rows no offset reads
    (dict(kernel_size=1), (5, 4)),
    (dict(kernel_size=3, stride=2, padding=1, dilation=2), (8, 8)),
    (dict(kernel_size=3, padding=1, groups=2), (6, 6)),
    (dict(kernel_size=3, padding=1, in_channels=3), (6, 6)),  # an RGB stem: unfolded
    (dict(kernel_size=3, padding="same"), (6, 5)),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), (6, 5)),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kwargs,hw", CONVS)
def test_kfac_expand_input_factor_equals_the_unfolded_rows_gram(bias, kwargs, hw):
    from torch.nn import functional as F

    from sensitivity.conv_factors import patch_gram

    torch.manual_seed(0)
    kwargs = dict(kwargs)
    cin = kwargs.pop("in_channels", 4)  # 4 and more take the shifted route at stride 1
    conv = nn.Conv2d(cin, 6, bias=bias, **kwargs).double()
    a = torch.randn(9, cin, *hw, dtype=torch.float64)
    st = {"A": None, "G": None, "T": 1}
    cov = KFACCovariance()
    cov.conv = "expand"
    if conv.groups != 1:  # factors per group: refused with the layer named
        with pytest.raises(ValueError, match="'0' is a grouped convolution"):
            KFACCovariance.fit(nn.Sequential(conv, nn.Flatten()), (a, torch.zeros(9, dtype=torch.long)))
        return
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):  # these test cases pad by 1
        padded = F.pad(a, (1, 1, 1, 1), mode=conv.padding_mode if conv.padding_mode != "zeros" else "constant")
        u = F.unfold(padded, conv.kernel_size, conv.dilation, 0, conv.stride)
    else:
        u = F.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    with torch.no_grad():  # the reference patches are the ones the layer reads
        out = conv(a).flatten(2)
        ref = conv.weight.flatten(1) @ u + (conv.bias[:, None] if bias else 0)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    rows = u.transpose(1, 2).reshape(-1, u.shape[1])
    if bias:
        rows = torch.cat([rows, torch.ones_like(rows[:, :1])], 1)
    cov._accumulate_a(st, conv, a)
    torch.testing.assert_close(st["A"], rows.T @ rows, rtol=0, atol=1e-10)
    assert st["T"] == u.shape[2]
    d = u.shape[1]
    torch.testing.assert_close(patch_gram(u, budget=1), rows[:, :d].T @ rows[:, :d], rtol=0, atol=1e-10)
