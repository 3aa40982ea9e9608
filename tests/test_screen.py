"""sensitivity.screen: the output layer's share of Σ equals the exact pass where the rest of the network has none,
keeps each example's index, and refuses models and covariances it does not apply to, saying why."""

import pytest
import torch
from torch import nn

from sensitivity import DenseCovariance, compute_sensitivities
from sensitivity import screen as screen_module
from sensitivity.screen import screen
from worker import models


def _data(n=48, d=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _variance(model, scale=0.05, body=True):
    out = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        v = scale * (1 + torch.rand(p.shape, generator=torch.Generator().manual_seed(i)))
        out[name] = v if body or name.startswith(_last(model)) else torch.zeros_like(p)
    return out


def _last(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1] + "."


@pytest.mark.parametrize("form", ["first_order", "rayleigh"])
def test_screening_equals_the_exact_pass_when_only_the_output_layer_has_variance(form):
    torch.manual_seed(0)
    model = models.mlp(12, 4, hidden=(16,))
    x, y = _data()
    var = _variance(model, body=False)
    exact = compute_sensitivities(model, (x, y), var, form=form)
    ids = torch.arange(100, 148)
    got = screen(model, [(x[:20], y[:20], ids[:20]), (x[20:], y[20:], ids[20:])], var, form=form, chunk_size=16)
    assert torch.equal(got.indices, ids)
    torch.testing.assert_close(got.scores, exact.scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.loo_losses, exact.loo_losses, rtol=1e-4, atol=1e-6)
    assert got.form == exact.form


def test_screening_reads_its_data_as_it_scores_it_not_all_first(monkeypatch):
    model = models.mlp(12, 4, hidden=(16,))
    x, y = _data()
    pulled, scored_after = [], []

    def source():
        for i in range(0, 48, 8):
            pulled.append(i)
            yield x[i:i + 8], y[i:i + 8], torch.arange(i, i + 8)

    real = screen_module.compute_sensitivities

    def spy(layer, data, *args, **kwargs):
        def counted():
            for chunk in data:
                scored_after.append(len(pulled))
                yield chunk
        return real(layer, counted(), *args, **kwargs)

    monkeypatch.setattr(screen_module, "compute_sensitivities", spy)
    got = screen(model, source(), _variance(model), chunk_size=16)
    assert scored_after == [2, 4, 6]  # each 16-row chunk scored once its two 8-row forward chunks are read
    assert torch.equal(got.indices, torch.arange(48))


def test_screening_leaves_out_the_body_so_scores_are_lower_but_rank_alike_on_a_wide_head():
    torch.manual_seed(1)
    model = models.mlp(12, 4, hidden=(64,))
    x, y = _data(n=200)
    var = _variance(model, scale=0.01)
    exact = compute_sensitivities(model, (x, y), var, form="first_order")
    got = screen(model, (x, y), var, form="first_order")
    assert (got.scores <= exact.scores * (1 + 1e-5)).float().mean() > 0.9  # a part of V_i, not all of it
    assert torch.equal(got.indices, torch.arange(200))
    from scipy.stats import spearmanr
    assert spearmanr(got.scores.numpy(), exact.scores.numpy()).statistic > 0.8


def test_screening_refuses_a_model_whose_output_comes_after_its_last_linear_layer():
    model = nn.Sequential(nn.Linear(12, 4), nn.Tanh())
    x, y = _data()
    with pytest.raises(ValueError, match="output is its last Linear layer's"):
        screen(model, (x, y), _variance(model))
    with pytest.raises(ValueError, match="no Linear layer"):
        screen(nn.Sequential(nn.Flatten()), (x, y), {})


def test_screening_refuses_a_dense_covariance_and_an_empty_data_source():
    model = models.logistic_regression(12, 4)
    x, y = _data()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="diagonal variance"):
        screen(model, (x, y), DenseCovariance(model, 0.01 * torch.eye(n)))
    with pytest.raises(ValueError, match="at least one example"):
        screen(model, [], _variance(model))
