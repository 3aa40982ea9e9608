"""IVON(noise="counter"): the counter-based Gaussian generator and the optimizer's use of it."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from ivon_core import IVON
from ivon_core.noise import counter_keys, counter_normal, fill_counter_, fill_counter_many_


def _keys(a, b):
    return torch.tensor(a, dtype=torch.int32), torch.tensor(b, dtype=torch.int32)


def test_counter_draws_are_standard_normal():
    z = counter_normal(2_000_000, *_keys(123, -456)).double().numpy()
    assert abs(z.mean()) < 0.003 and abs(z.std() - 1.0) < 0.003
    assert abs(stats.kurtosis(z)) < 0.02 and abs(stats.skew(z)) < 0.01
    assert stats.kstest(z[:500_000], "norm").pvalue > 1e-3
    assert 4.5 < np.abs(z).max() <= 5.4  # the tails are there, and bounded by the 23-bit uniform
    # tail mass beyond 3 sigma matches the normal's (within 4 binomial standard errors)
    p3 = 2 * stats.norm.sf(3.0)
    assert abs((np.abs(z) > 3).mean() - p3) < 4 * np.sqrt(p3 / len(z))
    # neighbouring draws are uncorrelated
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.003


def test_nearby_keys_give_unrelated_streams():
    n = 1 << 20
    base = counter_normal(n, *_keys(1000, 7))
    # two independent streams share values by chance (2**23 levels); a permuted copy would share nearly all
    chance = np.intersect1d(base.numpy(), counter_normal(n, *_keys(0x1234567, -0x7654321)).numpy()).size
    for k in (_keys(1001, 7), _keys(1000 ^ (1 << 19), 7), _keys(1000, 8)):
        other = counter_normal(n, *k)
        assert abs(np.corrcoef(base.numpy(), other.numpy())[0, 1]) < 0.005
        # (idx ^ key1 alone would make the first two a permutation of the same values)
        shared = np.intersect1d(base.numpy(), other.numpy()).size
        assert shared < 1.2 * chance, (shared, chance)


def test_the_stream_does_not_depend_on_chunking_or_batching():
    k = _keys(-5, 99)
    whole = counter_normal(10_000, *k)
    assert torch.equal(fill_counter_(torch.empty(100, 100), *k, chunk=333).view(-1), whole)
    assert torch.equal(counter_normal(4_000, *k, offset=6_000), whole[6_000:])
    # many tensors with their own keys, drawn in blocks (small) or alone (large): each equals its own stream
    tensors = [torch.empty(s) for s in ((3, 4), (700,), (5,), (2_000,), (1,), (40, 10))]
    keys = counter_keys(len(tensors), torch.Generator().manual_seed(0))
    fill_counter_many_(tensors, keys, block=1_000)
    for t, (k1, k2) in zip(tensors, keys):
        assert torch.equal(t.view(-1), counter_normal(t.numel(), k1, k2))
    double = torch.empty(50, dtype=torch.float64)
    fill_counter_many_([double, torch.empty(3)], keys[:2])
    assert torch.equal(double, counter_normal(50, *keys[0]).double())


def test_a_stream_longer_than_the_counter_is_refused():
    with pytest.raises(ValueError, match="2\\*\\*31"):
        counter_normal(10, *_keys(0, 0), offset=2**31 - 5)


def _sample_spread(noise, seed, **kw):
    torch.manual_seed(0)
    lin = nn.Linear(300, 300)
    opt = IVON(lin.parameters(), lr=0.1, ess=4.0, hess_init=1.0, weight_decay=0.0, noise=noise, **kw)
    mean = lin.weight.detach().clone()
    torch.manual_seed(seed)
    with opt.sampled_params():
        return lin.weight.detach() - mean


def test_counter_noise_is_seeded_by_torch_and_has_the_posterior_spread():
    a, b, c = _sample_spread("counter", 1), _sample_spread("counter", 1), _sample_spread("counter", 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.mean()) == pytest.approx(0.0, abs=0.005) and float(a.std()) == pytest.approx(0.5, rel=0.01)
    assert not torch.equal(a, _sample_spread("torch", 1))  # a different generator, not the same numbers


def test_counter_noise_resumes_bitwise(tmp_path):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))

    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)

    def run(m, opt, steps):
        for _ in range(steps):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    ref = model()
    ref_opt = IVON(ref.parameters(), lr=0.05, ess=48, beta2=0.99, noise="counter")
    torch.manual_seed(5)
    run(ref, ref_opt, 20)
    m = model()
    opt = IVON(m.parameters(), lr=0.05, ess=48, beta2=0.99, noise="counter")
    torch.manual_seed(5)
    run(m, opt, 8)
    torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "c.pt")
    ck = torch.load(tmp_path / "c.pt")
    m2 = model()
    m2.load_state_dict(ck["model"])
    opt2 = IVON(m2.parameters(), lr=0.05, ess=48, beta2=0.99, noise="counter")
    opt2.load_state_dict(ck["opt"])
    torch.set_rng_state(ck["rng"])
    run(m2, opt2, 12)
    for p, q in zip(m2.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt2.state[p]["hess"], ref_opt.state[q]["hess"])
    assert opt2.state_dict()["ivon"]["noise_kind"] == "counter"


def test_unknown_noise_is_refused_naming_it():
    with pytest.raises(ValueError, match="noise") as err:
        IVON(nn.Linear(2, 2).parameters(), lr=0.1, ess=1.0, noise="philox")
    assert "'philox'" in str(err.value)


def test_counter_draws_are_the_inverse_normal_cdf_of_their_uniforms():
    from scipy.special import erfinv

    from ivon_core.noise import _log, _uniform_at

    k = _keys(77, -3)
    idx = torch.arange(0, 1 << 21, dtype=torch.int32)
    t = _uniform_at(idx, *k)
    z = counter_normal(idx.numel(), *k).double().numpy()
    want = np.sqrt(2.0) * erfinv(t.double().numpy())
    assert np.max(np.abs(z / want - 1)) < 3.5e-6
    # the extremes the 23-bit uniform reaches, where the polynomial ends
    edge = torch.tensor([-1 + 2**-23, 1 - 2**-23, -2**-23, 2**-23, 0.5], dtype=torch.float32)
    w = -_log((1.0 - edge) * (1.0 + edge)).double().numpy()
    assert np.allclose(w, -np.log1p(-edge.double().numpy() ** 2), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("noise,fused", [("torch", False), ("blocks", False), ("counter", True)])
def test_sampling_inside_preserved_noise_leaves_the_training_noise_as_it_was(noise, fused):
    """predict (or any sampling) inside preserved_noise between steps: the same weights as without it."""
    from ivon_core import predict, preserved_noise

    def train(evaluate_at):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 3))
        opt = IVON(model.parameters(), lr=0.1, ess=100, noise=noise, fused=fused)
        x, y = torch.randn(64, 300), torch.randint(0, 3, (64,))
        for i in range(5):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if i in evaluate_at:
                with preserved_noise(opt):
                    predict(model, x, opt, mc_samples=3)
                    torch.randn(10)  # torch's generator moved by anything else inside, too
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train(()), train((1, 3)))
