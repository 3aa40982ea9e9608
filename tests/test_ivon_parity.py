"""Parity with the official ivon-opt 0.1.3 (same seed, same noise, 200 steps)."""

import types

import pytest
import torch

ivon = pytest.importorskip("ivon")

from ivon_core import IVON  # noqa: E402


def _mlp(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def _aligned_torch(groups):
    """ivon-opt draws one randn per param group, ours one normal_ per tensor: draw ivon-opt's noise our way."""
    sizes = {sum(p.numel() for p in g): [p.numel() for p in g] for g in groups}

    def randn(n, device=None, dtype=None):
        return torch.cat([torch.randn(k, device=device, dtype=dtype) for k in sizes[n]])

    names = {k: getattr(torch, k) for k in dir(torch) if not k.startswith("__") and k != "randn"}
    return types.SimpleNamespace(**names, randn=randn)


def _groups(model, two_groups):
    ps = list(model.parameters())
    if not two_groups:
        return [{"params": ps}]
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "ess": 200.0}]


def _train(cls, dtype, steps=200, **kw):
    model = _mlp(dtype)
    two = kw.pop("two_groups", False)
    opt = cls(_groups(model, two), lr=0.05, ess=64, hess_init=0.5, beta2=0.999, **kw)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(1)
    for _ in range(steps):
        for _ in range(opt.mc_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


CASES = {
    "price": {},
    "gradsq": {"hess_approx": "gradsq"},
    "clip_radius": {"clip_radius": 0.01},
    "two_groups": {"two_groups": True},
    "mc_samples_2": {"mc_samples": 2},
}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", list(CASES))
def test_means_and_hessian_match_ivon_opt(monkeypatch, case, dtype, tol):
    groups = _groups(_mlp(dtype), CASES[case].get("two_groups", False))
    monkeypatch.setattr(ivon._ivon, "torch", _aligned_torch([g["params"] for g in groups]))
    ref_model, ref_opt = _train(ivon.IVON, dtype, **CASES[case])
    model, opt = _train(IVON, dtype, noise_threads=1, **CASES[case])
    ref_m = torch.cat([p.detach().flatten() for p in ref_model.parameters()])
    m = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref_h = torch.cat([g["hess"] for g in ref_opt.param_groups])
    h = torch.cat([opt.state[p]["hess"].flatten() for p in model.parameters()])
    assert torch.linalg.vector_norm(m - ref_m) <= tol * torch.linalg.vector_norm(ref_m)
    assert torch.linalg.vector_norm(h - ref_h) <= tol * torch.linalg.vector_norm(ref_h)
    assert ((h - ref_h).abs() / ref_h.abs()).max() <= 10 * tol
    assert opt.current_step == ref_opt.current_step == 200
