"""worker.screening: the screen is checked against the exact slice and its rows are used only where it agrees,
mapped onto the exact pass's scale; a budgeted job writes them marked, and says so in its metrics."""

import numpy as np
import pytest
import torch

from sensitivity import compute_sensitivities
from worker import models
from worker.screening import Screened, available, run, to_scale


def test_to_scale_maps_the_slices_quantiles_onto_the_exact_ones_and_keeps_the_order():
    g = np.random.default_rng(0)
    exact = g.gamma(2.0, 1.0, 500)
    screened = 0.6 * exact ** 0.9  # lower and bent, in the same order
    got = to_scale(screened, screened, exact)
    np.testing.assert_allclose(np.sort(got), np.sort(exact))
    fresh = 0.6 * g.gamma(2.0, 1.0, 300) ** 0.9
    mapped = to_scale(fresh, screened, exact)
    assert (np.diff(mapped[np.argsort(fresh)]) >= -1e-12).all()  # monotone
    top = to_scale(np.array([2 * screened.max(), np.nan]), screened, exact)
    assert top[0] == pytest.approx(2 * exact.max()) and np.isnan(top[1])  # beyond the slice: in proportion


class _Data:
    def __init__(self, n=300, d=10, k=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.xtr, self.ytr = torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _setup(head_only: bool):
    torch.manual_seed(0)
    model = models.mlp(10, 3, hidden=(32,))
    last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1] + "."
    var = {n: (0.02 if n.startswith(last) else (0.0 if head_only else 0.5)) * torch.ones_like(p)
           for n, p in model.named_parameters()}
    data = _Data()
    res = compute_sensitivities(model, (data.xtr[:100], data.ytr[:100]), var, form="first_order")
    res.indices = torch.arange(100)
    return model, data, var, res


def test_an_agreeing_screen_adds_the_sweeps_rows_on_the_exact_scale_and_marks_them():
    model, data, var, res = _setup(head_only=True)  # the screen is then exact: ρ = 1
    out = run(model, data, var, "first_order", res.indices, res, torch.arange(50, 300), min_spearman=0.95, chunk=64,
              max_amplification="auto")
    assert out.agrees and out.metrics["screen_spearman"] == pytest.approx(1.0)
    assert sorted(out.idx.tolist()) == list(range(100, 300))  # the sweep less the slice's own examples
    truth = compute_sensitivities(model, (data.xtr[100:], data.ytr[100:]), var, form="first_order")
    rows = out.rows(res)
    assert len(rows["idx"]) == 300 and rows["screened"].sum() == 200 and not rows["screened"][:100].any()
    np.testing.assert_array_equal(rows["idx"][:100], res.indices.numpy())
    order = 100 + np.argsort(rows["idx"][100:])
    assert np.corrcoef(rows["scores"][order], truth.scores.numpy())[0, 1] > 0.99  # mapped onto the exact scale
    # the map is monotone: the screened rows rank as the screen did
    assert (np.diff(rows["scores"][100:][np.argsort(out.got["scores"])]) >= 0).all()
    assert rows["prob_label"].shape == (300,) and rows["class_probs"].shape == (300, 3)
    assert out.count == 300 and out.seconds > 0 and out.metrics["screened"] == 200


def test_a_screen_that_disagrees_adds_nothing_but_its_measured_agreement():
    model, data, var, res = _setup(head_only=False)  # most of V in the body: the head ranks otherwise
    out = run(model, data, var, "first_order", res.indices, res, torch.arange(300), min_spearman=0.999, chunk=64,
              max_amplification="auto")
    assert not out.agrees and out.metrics["screen_spearman"] < 0.999
    assert len(out.idx) == 0 and out.metrics["screened"] == 0 and out.count == 100  # the check alone
    rows = out.rows(res)
    assert rows["screened"] is None and len(rows["idx"]) == 100
    assert Screened().rows(res)["scores"] is not None


def test_available_says_why_a_model_or_covariance_cannot_be_screened():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(-1))
    assert available(torch.nn.Sequential(torch.nn.Flatten()), {}) is not None
    assert available(model, object()) == "screening needs a diagonal variance"
    assert available(model, {n: torch.ones_like(p) for n, p in model.named_parameters()}) is None


def test_the_check_lines_the_screen_up_with_the_exact_slice_in_its_order():
    model, data, var, _ = _setup(head_only=True)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(3))[:100]  # a slice in no sorted order
    res = compute_sensitivities(model, (data.xtr[perm], data.ytr[perm]), var, form="first_order")
    res.indices = perm
    out = run(model, data, var, "first_order", perm, res, torch.zeros(0, dtype=torch.long), min_spearman=0.95,
              chunk=64, max_amplification="auto")
    assert out.metrics["screen_spearman"] == pytest.approx(1.0) and out.count == 100 and not len(out.idx)
    np.testing.assert_allclose(out.check["scores"], res.scores.double().numpy(), rtol=1e-4)
    with pytest.raises(RuntimeError, match="did not cover"):  # a check that missed part of the slice
        run(model, data, var, "first_order", perm[:50], res, torch.zeros(0, dtype=torch.long), min_spearman=0.95,
            chunk=64, max_amplification="auto")


def test_a_sweep_over_every_example_is_the_estimates_control_and_shrinks_its_error():
    from worker.sampling import loo_estimate

    model, data, var, res = _setup(head_only=True)
    out = run(model, data, var, "first_order", res.indices, res, torch.arange(300), min_spearman=0.95, chunk=64,
              max_amplification="auto")
    sample, rest = res.indices.numpy(), np.arange(300)
    x, everyone = out.control(sample, rest)
    np.testing.assert_allclose(x, res.loo_losses.numpy(), rtol=1e-5)  # the head-only screen is the exact pass
    truth = compute_sensitivities(model, (data.xtr, data.ytr), var, form="first_order").loo_losses.double()
    np.testing.assert_allclose(everyone, truth.numpy(), rtol=1e-5)
    population = np.bincount(data.ytr.numpy(), minlength=3)
    with_screen = loo_estimate(res.loo_losses.numpy(), res.targets.numpy(), population, control=(x, everyone))
    stratified = loo_estimate(res.loo_losses.numpy(), res.targets.numpy(), population)
    assert with_screen[0] == pytest.approx(float(truth.mean()), rel=1e-4)
    assert with_screen[1] < 0.01 * stratified[1]
    # not every example screened, or a screen that disagrees: no control
    assert out.control(sample, np.arange(301)) is None
    partial = run(model, data, var, "first_order", res.indices, res, torch.arange(50, 200), min_spearman=0.95,
                  chunk=64, max_amplification="auto")
    assert partial.control(sample, rest) is None and partial.control(sample, np.arange(200)) is not None
    model, data, var, res = _setup(head_only=False)
    disagrees = run(model, data, var, "first_order", res.indices, res, torch.arange(300), min_spearman=0.999,
                    chunk=64, max_amplification="auto")
    assert disagrees.control(res.indices.numpy(), rest) is None and Screened().control(sample, rest) is None
