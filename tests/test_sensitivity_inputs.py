"""Bad input, empty sources, normalization layers, rankings, losses and bounded memory."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from sensitivity import compute_sensitivities, ivon_variance, sgd_variance
from sensitivity.variance import adamw_variance


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _var(model, value=0.01):
    return [torch.full_like(p, value) for p in model.parameters()]


def test_label_out_of_range_names_the_example():
    model = _model()
    x, y = torch.randn(10, 4), torch.tensor([0, 1, 2, 0, 1, 7, 0, 1, 2, 0])
    with pytest.raises(ValueError, match="label 7 of example 5 is outside"):
        compute_sensitivities(model, (x, y), _var(model))


def test_non_finite_output_names_the_example():
    model = _model()
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite model output for example 3"):
        compute_sensitivities(model, (x, y), _var(model), form="first_order")
    with pytest.raises(ValueError, match="non-finite model output for example 3"):
        compute_sensitivities(model, (x, y), _var(model), form="corrected")


def test_non_finite_or_misshapen_variance_names_the_parameter():
    model = _model()
    x, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    bad = _var(model)
    bad[2][1] = float("inf")
    with pytest.raises(ValueError, match="parameter '2.weight' has non-finite"):
        compute_sensitivities(model, (x, y), bad)
    with pytest.raises(ValueError, match="parameter '0.bias' has shape"):
        compute_sensitivities(model, (x, y), {"0.bias": torch.ones(5)})
    with pytest.raises(ValueError, match="3 tensors, the model has 4"):
        compute_sensitivities(model, (x, y), _var(model)[:3])
    with pytest.raises(ValueError, match="does not have"):
        compute_sensitivities(model, (x, y), {"nope": torch.ones(1)})


def test_mismatched_inputs_and_targets():
    model = _model()
    with pytest.raises(ValueError, match="inputs have 5 examples but targets 4"):
        compute_sensitivities(model, (torch.randn(5, 4), torch.zeros(4, dtype=torch.long)), _var(model))
    with pytest.raises(ValueError, match="Invalid form"):
        compute_sensitivities(model, (torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), _var(model), form="x")
    with pytest.raises(ValueError, match="Invalid loss"):
        compute_sensitivities(model, (torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), _var(model), loss="hinge")


def test_empty_source_gives_empty_result():
    model = _model()
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 4),
                                                                       torch.empty(0, dtype=torch.long)))
    res = compute_sensitivities(model, empty, _var(model))
    assert len(res) == 0 and math.isnan(res.loo) and res.top_k(5).numel() == 0


def test_rankings_follow_scores():
    model = _model()
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    res = compute_sensitivities(model, (x, y), _var(model, 0.5), form="first_order")
    top, bottom = res.top_k(5), res.bottom_k(5)
    assert res.scores[top[0]] == res.scores.max() and res.scores[bottom[0]] == res.scores.min()
    assert (res.scores[top[:-1]] >= res.scores[top[1:]]).all()
    assert torch.allclose(res.scores, res.deviations.abs().sum(1))
    assert torch.allclose(res.loo_probs, torch.exp(-res.loo_losses))


def test_batchnorm_model_uses_running_statistics_and_keeps_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    model.train()
    model(torch.randn(64, 4, dtype=torch.float64))  # populate running stats
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    res = compute_sensitivities(model, (x, y), _var(model), form="first_order")
    assert model.training
    model.eval()
    assert torch.allclose(res.logits, model(x).detach())
    single = compute_sensitivities(model, (x[:1], y[:1]), _var(model), form="first_order")
    assert torch.allclose(single.deviations[0], res.deviations[0])  # per-example, not batch statistics


def test_binary_logistic_and_squared_error_losses():
    torch.manual_seed(0)
    x = torch.randn(30, 3, dtype=torch.float64)
    lin = nn.Linear(3, 1).double()
    yb = torch.randint(0, 2, (30,)).double()
    res = compute_sensitivities(lin, (x, yb), _var(lin), loss="binary_logistic", form="corrected")
    p = torch.sigmoid(lin(x).detach()[:, 0])
    assert torch.allclose(res.residuals[:, 0], p - yb)
    with pytest.raises(ValueError, match="is not 0 or 1"):
        compute_sensitivities(lin, (x, yb + 2), _var(lin), loss="binary_logistic")
    yr = torch.randn(30, 1, dtype=torch.float64)
    reg = compute_sensitivities(lin, (x, yr), _var(lin), loss="squared_error", noise_var=0.5, form="corrected")
    # squared error, Λ = I/s²: V(I − ΛV)^{-1}e with scalar V_i
    fo = compute_sensitivities(lin, (x, yr), _var(lin), loss="squared_error", noise_var=0.5, form="first_order")
    v = fo.deviations[:, 0] / fo.residuals[:, 0]
    assert torch.allclose(reg.deviations[:, 0], v / (1 - v / 0.5) * fo.residuals[:, 0])
    assert reg.loo_probs is None


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_float32_matches_float64(device):
    model = _model().to(device)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    r32 = compute_sensitivities(model, (x, y), _var(model, 0.1))
    model = model.cpu()
    r64 = compute_sensitivities(model.double(), (x.double(), y), [v.double() for v in _var(model, 0.1)])
    assert torch.allclose(r32.deviations.double(), r64.deviations, rtol=1e-4, atol=1e-6)


def test_variance_providers():
    from ivon_core import IVON

    model = _model()
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    opt = IVON(model.parameters(), lr=0.1, ess=40, hess_init=0.5, weight_decay=1e-3)
    v = ivon_variance(opt, model)
    assert set(v) == {n for n, _ in model.named_parameters()}
    assert torch.allclose(v["0.weight"], torch.full((6, 4), 1 / (40 * 0.501)))
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    with pytest.raises(ValueError, match="take a step"):
        adamw_variance(adam, 40)
    nn.functional.cross_entropy(model(x), y).backward()
    adam.step()
    av = adamw_variance(adam, 40, model)
    st = adam.state[model[0].weight]["exp_avg_sq"]
    assert torch.allclose(av["0.weight"], 1 / (40 * st.sqrt() + 0.01))
    sv = sgd_variance(model, (x, y), prior_precision=2.0)
    assert all((s > 0).all() and (s <= 0.5).all() for s in sv.variances.values())
    res = compute_sensitivities(model, (x, y), sv)
    assert torch.isfinite(res.scores).all()


@pytest.mark.slow
def test_memory_does_not_grow_with_n_over_a_large_stream():
    """1.3M examples stream through iter_sensitivities; peak RSS at 1.3M ≈ at 130k."""
    code = textwrap.dedent("""
        import resource, sys, torch
        from torch import nn
        from sensitivity import iter_sensitivities
        n = int(sys.argv[1]); torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
        var = [torch.full_like(p, 1e-3) for p in model.parameters()]
        class Source(torch.utils.data.IterableDataset):
            def __iter__(self):
                g = torch.Generator().manual_seed(1)
                for s in range(0, n, 8192):
                    b = min(8192, n - s)
                    yield torch.randn(b, 8, generator=g), torch.randint(0, 10, (b,), generator=g)
        loader = torch.utils.data.DataLoader(Source(), batch_size=None)
        total, seen = 0.0, 0
        for part in iter_sensitivities(model, loader, var, form="first_order", chunk_size=8192):
            total += float(part.loo_losses.sum()); seen += len(part)
        assert seen == n
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    rss = {}
    for n in (130_000, 1_300_000):
        out = subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True, check=True)
        rss[n] = int(out.stdout.strip())
    assert rss[1_300_000] <= 1.1 * rss[130_000] + 20_000, rss


def test_auto_form_and_cap_follow_the_covariance_and_bad_caps_are_refused():
    from sensitivity.covariance import DenseCovariance

    model = _model().double()
    x, y = torch.randn(30, 4, dtype=torch.float64) * 3, torch.randint(0, 3, (30,))
    var = _var(model, 0.5)  # large: the caps bind for some examples
    auto = compute_sensitivities(model, (x, y), var)
    assert auto.form == "rayleigh"
    explicit = compute_sensitivities(model, (x, y), var, form="rayleigh", max_amplification=2.0)
    assert torch.equal(auto.deviations, explicit.deviations) and auto.guarded.any()
    dense = DenseCovariance(model, torch.diag(torch.cat([v.flatten() for v in var])))
    auto = compute_sensitivities(model, (x, y), dense)
    assert auto.form == "corrected"
    explicit = compute_sensitivities(model, (x, y), dense, form="corrected", max_amplification=10.0)
    assert torch.equal(auto.deviations, explicit.deviations)
    for bad in (1.0, 0.5, "big", float("nan")):
        with pytest.raises(ValueError, match="max_amplification"):
            compute_sensitivities(model, (x, y), var, max_amplification=bad)
