"""IVON on a CUDA device: the same behaviour as on the CPU (skipped where no GPU is present)."""

import pytest
import torch
from torch import nn

from ivon_core import IVON, all_metrics, predict
from ivon_core.noise import counter_normal
from tests.test_ivon_optimizer import _train_steps as _train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).to(device, dtype)


def _data(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    return x.to(device, dtype), y.to(device)


def test_counter_noise_is_the_same_stream_on_cuda():
    k1, k2 = torch.tensor(12345, dtype=torch.int32), torch.tensor(-777, dtype=torch.int32)
    cpu = counter_normal(1 << 20, k1, k2, "cpu")
    gpu = counter_normal(1 << 20, k1.cuda(), k2.cuda(), "cuda").cpu()
    assert torch.allclose(cpu, gpu, rtol=1e-5, atol=1e-6)


def test_counter_noise_trajectory_on_cuda_matches_the_cpu():
    runs = []
    for device in ("cpu", "cuda"):
        model = _model(dtype=torch.float64, device=device)
        opt = IVON(model.parameters(), lr=0.05, ess=48, hess_init=0.3, beta2=0.99, noise="counter")
        torch.manual_seed(5)  # the counter keys come from the CPU generator on every device
        _train(model, opt, 20, *_data(device, torch.float64))
        runs.append((model, opt))
    (cm, co), (gm, go) = runs
    for p, q in zip(cm.parameters(), gm.parameters()):
        assert torch.allclose(p, q.cpu(), rtol=1e-5, atol=1e-7)
        assert torch.allclose(co.state[p]["hess"], go.state[q]["hess"].cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("noise", ["torch", "counter"])
def test_stop_and_resume_on_cuda_is_bitwise(tmp_path, noise):
    x, y = _data("cuda")
    ref = _model(device="cuda")
    ref_opt = IVON(ref.parameters(), lr=0.05, ess=48, hess_init=0.3, beta2=0.99, noise=noise)
    torch.manual_seed(5)
    _train(ref, ref_opt, 20, x, y)

    model = _model(device="cuda")
    opt = IVON(model.parameters(), lr=0.05, ess=48, hess_init=0.3, beta2=0.99, noise=noise)
    torch.manual_seed(5)
    _train(model, opt, 8, x, y)
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state()}, tmp_path / "c.pt")
    ck = torch.load(tmp_path / "c.pt")
    model2 = _model(seed=3, device="cuda")
    model2.load_state_dict(ck["m"])
    opt2 = IVON(model2.parameters(), lr=0.05, ess=48, hess_init=0.3, beta2=0.99, noise=noise)
    opt2.load_state_dict(ck["o"])
    torch.set_rng_state(ck["rng"])
    torch.cuda.set_rng_state(ck["cuda_rng"])
    _train(model2, opt2, 12, x, y)
    for p, q in zip(model2.parameters(), ref.parameters()):
        assert p.is_cuda and torch.equal(p, q)
        assert torch.equal(opt2.state[p]["hess"], ref_opt.state[q]["hess"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_on_cuda_keep_float32_state(dtype):
    model = _model(device="cuda", dtype=dtype)
    opt = IVON(model.parameters(), lr=0.05, ess=48, hess_init=0.5, beta2=0.9)
    _train(model, opt, 5, *_data("cuda", dtype))
    st = opt.state[model[0].weight]
    assert st["hess"].is_cuda and st["hess"].dtype == torch.float32
    assert (st["hess"] - 0.5).abs().max() > 1e-3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fused_on_cuda_keeps_the_multi_tensor_path():
    x, y = _data("cuda")
    out = []
    for fused in (False, True):
        model = _model(device="cuda")
        opt = IVON(model.parameters(), lr=0.05, ess=48, beta2=0.99, fused=fused)
        torch.manual_seed(5)
        torch.cuda.manual_seed(5)
        _train(model, opt, 10, x, y)
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(out[0], out[1])


def test_predict_on_cuda_averages_samples_and_keeps_the_mean():
    x, y = _data("cuda")
    model = _model(device="cuda")
    opt = IVON(model.parameters(), lr=0.05, ess=48, beta2=0.99)
    _train(model, opt, 30, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    pred = predict(model, (x, y), opt, mc_samples=8)
    assert pred.mc.shape == (48, 3) and torch.equal(pred.targets, y.cpu())
    assert torch.allclose(pred.mc.sum(-1), torch.ones(48), atol=1e-5)
    assert not torch.allclose(pred.mc, pred.mean)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_metrics_on_cuda_equal_the_cpu_ones_with_labels_on_either_device():
    g = torch.Generator().manual_seed(3)
    probs = torch.randn(200, 5, generator=g).softmax(-1)
    y = torch.randint(0, 5, (200,), generator=g)
    want = all_metrics(probs, y)
    for targets in (y.cuda(), y):
        got = all_metrics(probs.cuda(), targets)
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-12 for k in want)
