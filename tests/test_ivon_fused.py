"""IVON(fused=True): the compiled kernels give the multi-tensor path's results, and fail over to it."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from ivon_core import IVON
from ivon_core._fused import MIN_NUMEL


def _model(dtype=torch.float32, deep=0):
    torch.manual_seed(0)
    # the 512x160 weight is above MIN_NUMEL (fused); the rest stay on the multi-tensor path (deep=3: small tensors of
    # more than MIN_NUMEL elements together, drawn by the compiled draw)
    hidden = [m for _ in range(deep) for m in (nn.Linear(160, 160), nn.Tanh())]
    return nn.Sequential(nn.Linear(20, 512), nn.Tanh(), nn.Linear(512, 160), nn.Tanh(), *hidden,
                         nn.Linear(160, 3)).to(dtype)


def _train(fused, steps=25, dtype=torch.float32, mc_samples=1, deep=0, **kw):
    kw.setdefault("noise", "torch")  # the default ("auto") would draw counter noise fused and torch's unfused
    model = _model(dtype, deep)
    opt = IVON(model.parameters(), lr=0.05, ess=64, hess_init=0.3, beta2=0.99, mc_samples=mc_samples,
               fused=fused, **kw)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 20, generator=g, dtype=dtype), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(11)
    for _ in range(steps):
        for _ in range(mc_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _max_rel(a, b):
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


@pytest.mark.parametrize("kw", [
    {},
    {"hess_approx": "gradsq"},
    {"clip_radius": 1e-3, "weight_decay": 1e-2},
    {"mc_samples": 2, "debias": False, "rescale_lr": False},
    {"dtype": torch.float64},
    {"noise": "counter"},
    {"noise": "counter", "hess_approx": "gradsq", "mc_samples": 2},
    {"noise": "counter", "dtype": torch.float64},
    {"noise": "counter", "deep": 3},
])
def test_fused_matches_the_multi_tensor_path(kw):
    assert _model()[2].weight.numel() >= MIN_NUMEL
    ref_model, ref = _train(False, **kw)
    model, opt = _train(True, **kw)
    assert opt._fused is not None and not opt._fused.broken
    small = sum(p.numel() for p in model.parameters() if p.numel() < MIN_NUMEL)
    assert (small >= MIN_NUMEL) == (kw.get("deep", 0) == 3)
    # counter noise: the kernel's float32 draws may differ from the eager ones in the last bit (vectorized log)
    tol = 1e-10 if kw.get("dtype") == torch.float64 and kw.get("noise") != "counter" else 2e-5
    assert _max_rel(list(model.parameters()), list(ref_model.parameters())) < tol
    hess = [opt.state[p]["hess"] for p in model.parameters()]
    ref_hess = [ref.state[p]["hess"] for p in ref_model.parameters()]
    assert _max_rel(hess, ref_hess) < tol
    assert min(h.min().item() for h in hess) > 0  # h moved and stayed positive
    assert _max_rel(hess, [torch.full_like(h, 0.3) for h in hess]) > 1e-3


def test_fused_state_dict_resumes_the_unfused_optimizer_and_back():
    model, opt = _train(True, steps=5)
    other = IVON(model.parameters(), lr=0.05, ess=64, hess_init=0.3, beta2=0.99)
    other.load_state_dict(opt.state_dict())
    assert other.current_step == 5
    back = IVON(model.parameters(), lr=0.05, ess=64, fused=True)
    back.load_state_dict(other.state_dict())
    assert back.current_step == 5


def test_fused_rejects_a_non_bool():
    with pytest.raises(ValueError, match="fused"):
        IVON(_model().parameters(), lr=0.1, ess=10, fused="yes")


@pytest.mark.parametrize("noise", ["torch", "counter", "auto"])
def test_a_failed_compilation_warns_and_falls_back(tmp_path, noise):
    # a C++ compiler that does not exist: inductor cannot build, the optimizer must still train (counter: the
    # small tensors' compiled draw fails over to the eager one as well; auto, the default: torch's noise, as
    # ivon-opt, since unfused counter noise is the slower draw)
    script = textwrap.dedent("""
        import warnings, torch
        from torch import nn
        from ivon_core import IVON
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 200), nn.Linear(200, 100))
        opt = IVON(model.parameters(), lr=0.05, ess=64, **({} if NOISE == "auto" else {"fused": True, "noise": NOISE}))
        x = torch.randn(8, 512)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    model(x).square().mean().backward()
                opt.step()
        assert opt._fused.broken
        said = [str(w.message) for w in caught]
        assert any("fused kernels failed" in m for m in said), said
        assert (NOISE == "counter") == any("noise draw failed" in m for m in said), said
        assert opt.noise == ("torch" if NOISE == "auto" else NOISE)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        print("FELL BACK")
    """).replace("NOISE", repr(noise))
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "CC": str(tmp_path / "no-such-compiler"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FELL BACK" in out.stdout


def _accumulate(fused, steps=6):
    model = _model()
    opt = IVON(model.parameters(), lr=0.05, ess=64, hess_init=0.3, beta2=0.99, fused=fused, noise="torch")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(11)
    for _ in range(steps):
        for part, w in ((slice(0, 40), 40.0), (slice(40, 64), 24.0)):  # two micro-batches, weighted by size
            with opt.sampled_params(train=True, weight=w):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        with opt.sampled_params():  # an evaluation sample between the last backward and step()
            model(x)
        opt.step()
    return model, opt


def test_a_kept_sample_is_settled_when_micro_batches_accumulate():
    # the fused path keeps θ of a step's first sample for the update kernel; a second one must settle it first
    ref_model, _ = _accumulate(False)
    model, opt = _accumulate(True)
    assert _max_rel(list(model.parameters()), list(ref_model.parameters())) < 2e-5


def test_changing_the_mean_between_sample_and_step_is_refused():
    model, opt = _train(True, steps=1)
    x = torch.randn(8, 20)
    with opt.sampled_params(train=True):
        opt.zero_grad()
        model(x).square().mean().backward()
    with torch.no_grad():
        model[2].weight.mul_(0.5)  # the fused path kept θ and reads the mean at step()
    with pytest.raises(RuntimeError, match="mean was changed"):
        opt.step()


def _counter_run(steps, opt=None, model=None, edit=None):
    """Fused counter-noise training of _model(); ``edit(opt, model, step)`` runs between a step and the next sample."""
    if model is None:
        model = _model()
        opt = IVON(model.parameters(), lr=0.05, ess=64, hess_init=0.3, beta2=0.99, fused=True, noise="counter")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 3, (64,), generator=g)
    samples = []
    for i in range(steps):
        if edit is not None:
            edit(opt, model, i)
        with opt.sampled_params(train=True):
            samples.append(model[2].weight.detach().clone())
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, samples


def test_the_update_kernel_writes_the_next_sample_and_it_is_the_one_the_sampling_kernel_draws(monkeypatch):
    from ivon_core._fused import FusedKernels

    torch.manual_seed(5)
    model, opt, ahead = _counter_run(6)
    big = model[2].weight
    assert "prepared" in opt._buf[big]  # the last step wrote the next sample
    calls = []
    real = FusedKernels.sample_counter_
    monkeypatch.setattr(FusedKernels, "sample_counter_", lambda self, out, *a, **k: (calls.append(len(out)),
                                                                                     real(self, out, *a, **k)))
    # the same run with every sample drawn by the sampling kernel (the written one discarded): bitwise equal
    torch.manual_seed(5)
    drop = lambda opt, model, i: [b.pop("prepared", None) for b in opt._buf.values()]  # noqa: E731
    model2, _, fresh = _counter_run(6, edit=drop)
    assert calls and all(n == 1 for n in calls)  # the one large tensor, each step
    assert all(torch.equal(a, b) for a, b in zip(ahead, fresh))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_a_written_sample_is_redrawn_when_its_keys_mean_or_ess_changed():
    def edit(opt, model, i):
        if i == 0:
            model[4].bias.requires_grad_(False)
        if i == 2:  # as many trainable tensors, but the large weight now takes the pending keys of another tensor
            model[0].bias.requires_grad_(False)
            model[4].bias.requires_grad_(True)
        if i == 3:
            with torch.no_grad():
                model[2].weight.mul_(0.5)  # e.g. a user's weight surgery between steps
        if i == 4:
            opt.param_groups[0]["ess"] = 640.0

    torch.manual_seed(5)
    model, opt, samples = _counter_run(6, edit=edit)
    # each sample is m + σε with the mean and ess of its own step: its spread around the mean follows ess
    torch.manual_seed(5)
    ref, _, ref_samples = _counter_run(6, edit=lambda o, m, i: (edit(o, m, i),
                                                                [b.pop("prepared", None) for b in o._buf.values()]))
    assert all(torch.equal(a, b) for a, b in zip(samples, ref_samples))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_fused_counter_noise_resumes_bitwise_across_the_written_sample(tmp_path):
    torch.manual_seed(7)
    ref, _, ref_samples = _counter_run(8)
    torch.manual_seed(7)
    model, opt, first = _counter_run(4)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()},
               tmp_path / "ckpt.pt")
    torch.manual_seed(999)  # the resumed run must not depend on the process's generator
    ck = torch.load(tmp_path / "ckpt.pt")
    model2 = _model()
    model2.load_state_dict(ck["model"])
    opt2 = IVON(model2.parameters(), lr=0.05, ess=64, hess_init=0.3, beta2=0.99, fused=True, noise="counter")
    opt2.load_state_dict(ck["opt"])
    torch.set_rng_state(ck["rng"])
    _, _, rest = _counter_run(4, opt2, model2)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, ref_samples))
    assert all(torch.equal(p, q) for p, q in zip(model2.parameters(), ref.parameters()))


def test_the_compiled_draw_of_small_tensors_gives_each_tensor_its_own_stream():
    from ivon_core._fused import FusedKernels
    from ivon_core.noise import counter_keys, counter_normal, draw_segments, fill_counter_many_

    k = FusedKernels()
    sizes = [40_000, 3, 25_000, 7_000, 1]  # more than MIN_NUMEL together, each below it
    tensors = [torch.empty(n) for n in sizes]
    keys = counter_keys(len(sizes), torch.Generator().manual_seed(4))
    fill_counter_many_(tensors, keys, draw=k.draw_segments)
    for t, (k1, k2) in zip(tensors, keys):
        # the compiled kernel's vectorized log may differ from the eager one in the last bit
        assert torch.allclose(t, counter_normal(t.numel(), k1, k2), rtol=1e-5, atol=1e-6)
    again = [torch.empty(n) for n in sizes]
    fill_counter_many_(again, keys, draw=k.draw_segments)  # the cached index serves the next draw
    assert all(torch.equal(a, b) for a, b in zip(tensors, again))
    assert k._draw is not None and k._draw is not draw_segments  # drawn by the compiled kernel
    fill_counter_many_(again, counter_keys(len(sizes), torch.Generator().manual_seed(5)), draw=k.draw_segments)
    assert not any(torch.equal(a, b) for a, b in zip(tensors[:1], again[:1]))


def test_the_defaults_choose_fused_counter_noise_for_large_cpu_models_and_ivon_opts_path_otherwise():
    # large: the 512x160 weight; the run is the explicit fused counter-noise run, bitwise
    torch.manual_seed(5)
    model = _model()
    opt = IVON(model.parameters(), lr=0.05, ess=64, hess_init=0.3, beta2=0.99)
    model, opt, samples = _counter_run(3, opt, model)
    assert opt.noise == "counter" and opt._fused is not None
    torch.manual_seed(5)
    ref, _, ref_samples = _counter_run(3)
    assert all(torch.equal(a, b) for a, b in zip(samples, ref_samples))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    # small: torch's generator and the multi-tensor path (ivon-opt's numbers; tests/test_ivon_parity.py)
    small = nn.Linear(20, 3)
    opt = IVON(small.parameters(), lr=0.05, ess=64)
    assert opt.noise == "auto"  # chosen at the first sample
    with opt.sampled_params(train=True):
        small(torch.randn(4, 20)).sum().backward()
    opt.step()
    assert opt.noise == "torch" and opt._fused is None
    # explicit choices are kept
    for fused, noise, want in ((False, "auto", "torch"), (None, "torch", "torch"), (True, "counter", "counter")):
        m = _model()
        o = IVON(m.parameters(), lr=0.05, ess=64, fused=fused, noise=noise)
        with o.sampled_params(train=True):
            m(torch.randn(4, 20)).sum().backward()
        o.step()
        assert o.noise == want and (o._fused is not None) == (fused is not False)


def test_a_state_dict_carries_its_noise_and_a_conflicting_one_is_refused():
    torch.manual_seed(7)
    model, opt, _ = _counter_run(2)
    sd = opt.state_dict()
    assert sd["ivon"]["noise_kind"] == "counter"
    # the default adopts the saved noise, even where it alone would choose torch's (a small model)
    lin = nn.Linear(20, 3)
    small = IVON(lin.parameters(), lr=0.05, ess=64)
    lin_sd = IVON(lin.parameters(), lr=0.05, ess=64, noise="counter")
    with lin_sd.sampled_params(train=True):
        lin(torch.randn(4, 20)).sum().backward()
    lin_sd.step()
    small.load_state_dict(lin_sd.state_dict())
    assert small.noise == "counter"
    # an explicit other noise would resume with other numbers: refused, nothing loaded
    other = IVON(_model().parameters(), lr=0.05, ess=64, noise="torch")
    with pytest.raises(ValueError, match="noise='counter'.*noise='torch'"):
        other.load_state_dict(sd)
    assert other.current_step == 0 and other.noise == "torch"
    # an unsampled default optimizer saves "auto", which any noise may load
    fresh = IVON(_model().parameters(), lr=0.05, ess=64).state_dict()
    assert fresh["ivon"]["noise_kind"] == "auto"
    IVON(_model().parameters(), lr=0.05, ess=64, noise="torch").load_state_dict(fresh)
