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


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    # the 512x160 weight is above MIN_NUMEL (fused); the rest stay on the multi-tensor path
    return nn.Sequential(nn.Linear(20, 512), nn.Tanh(), nn.Linear(512, 160), nn.Tanh(), nn.Linear(160, 3)).to(dtype)


def _train(fused, steps=25, dtype=torch.float32, mc_samples=1, **kw):
    model = _model(dtype)
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
])
def test_fused_matches_the_multi_tensor_path(kw):
    assert _model()[2].weight.numel() >= MIN_NUMEL
    ref_model, ref = _train(False, **kw)
    model, opt = _train(True, **kw)
    assert opt._fused is not None and not opt._fused.broken
    # counter noise: the kernel's float32 draws may differ from the eager ones in the last bit (vectorized log)
    tol = 1e-10 if kw.get("dtype") == torch.float64 and "noise" not in kw else 2e-5
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


def test_a_failed_compilation_warns_and_falls_back(tmp_path):
    # a C++ compiler that does not exist: inductor cannot build, the optimizer must still train
    script = textwrap.dedent("""
        import warnings, torch
        from torch import nn
        from ivon_core import IVON
        torch.manual_seed(0)
        model = nn.Linear(512, 256)
        opt = IVON(model.parameters(), lr=0.05, ess=64, fused=True)
        x = torch.randn(8, 512)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    model(x).square().mean().backward()
                opt.step()
        assert opt._fused.broken
        assert any("fused" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert all(torch.isfinite(p).all() for p in model.parameters())
        print("FELL BACK")
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "CC": str(tmp_path / "no-such-compiler"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FELL BACK" in out.stdout


def _accumulate(fused, steps=6):
    model = _model()
    opt = IVON(model.parameters(), lr=0.05, ess=64, hess_init=0.3, beta2=0.99, fused=fused)
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
