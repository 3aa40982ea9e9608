"""IVON behaviour: the seven ivon-opt defects, bad input, schedulers, precision and device handling."""

import copy

import pytest
import torch
from torch import nn

from ivon_core import IVON


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def _data(n=48):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train_steps(model, opt, steps, x, y):
    for _ in range(steps):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    "kw,name",
    [({"lr": -1.0}, "lr"), ({"ess": 0.0}, "ess"), ({"beta1": 1.5}, "beta1"), ({"beta2": -0.1}, "beta2"),
     ({"hess_approx": "newton"}, "hess_approx"), ({"mc_samples": 0}, "mc_samples"),
     ({"hess_init": 0.0}, "hess_init"), ({"clip_radius": 0.0}, "clip_radius"), ({"lr": float("nan")}, "lr"),
     ({"ess": float("inf")}, "ess"), ({"weight_decay": 1e400}, "weight_decay"), ({"lr": "0.1"}, "lr"),
     ({"mc_samples": True}, "mc_samples"), ({"hess_init": torch.ones(2)}, "hess_init")],
)
def test_invalid_hyperparameters_name_argument_and_value(kw, name):
    args = {"lr": 0.1, "ess": 10.0, **kw}
    with pytest.raises(ValueError, match=name) as err:
        IVON(_model().parameters(), **args)
    assert repr(kw[name]) in str(err.value)


def test_step_without_sampled_gradient_raises_clear_error():
    opt = IVON(_model().parameters(), lr=0.1, ess=10)
    with pytest.raises(RuntimeError, match="sampled_params"):
        opt.step()


def test_stop_and_resume_is_bitwise_equal_to_uninterrupted_run(tmp_path):
    x, y = _data()
    ref = _model()
    ref_opt = IVON(ref.parameters(), lr=0.05, ess=48, hess_init=0.3, beta2=0.99)
    torch.manual_seed(5)
    _train_steps(ref, ref_opt, 30, x, y)

    model = _model()
    opt = IVON(model.parameters(), lr=0.05, ess=48, hess_init=0.3, beta2=0.99)
    torch.manual_seed(5)
    _train_steps(model, opt, 12, x, y)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()},
               tmp_path / "ckpt.pt")

    resumed = _model(seed=99)
    ropt = IVON(resumed.parameters(), lr=0.05, ess=48, hess_init=0.3, beta2=0.99)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    assert ropt.current_step == 12
    _train_steps(resumed, ropt, 18, x, y)
    assert torch.equal(_flat(resumed), _flat(ref))
    for p, q in zip(resumed.parameters(), ref.parameters()):
        assert torch.equal(ropt.state[p]["hess"], ref_opt.state[q]["hess"])


def test_params_with_grad_none_are_left_alone():
    x, _ = _data()
    head_a, head_b = nn.Linear(6, 2), nn.Linear(6, 2)
    opt = IVON([*head_a.parameters(), *head_b.parameters()], lr=0.1, ess=48)
    before = [p.detach().clone() for p in head_b.parameters()]
    with opt.sampled_params(train=True):
        opt.zero_grad()
        head_a(x).square().mean().backward()  # head_b unused: grad None
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(head_b.parameters(), before))
    assert all(not opt.state[p] or float(opt.state[p]["step"]) == 0 for p in head_b.parameters())
    assert float(opt.state[head_a.weight]["step"]) == 1


def test_frozen_params_are_neither_sampled_nor_updated():
    model = _model()
    model[0].weight.requires_grad_(False)
    trainable_mean = model[2].weight.detach().clone()
    frozen = model[0].weight.detach().clone()
    opt = IVON(model.parameters(), lr=0.1, ess=48, weight_decay=0.1)
    x, y = _data()
    with opt.sampled_params(train=True):
        assert torch.equal(model[0].weight, frozen)
        assert not torch.equal(model[2].weight, trainable_mean)
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert not opt.state.get(model[0].weight)


def test_exception_inside_sampled_params_restores_the_mean():
    model = _model()
    opt = IVON(model.parameters(), lr=0.1, ess=48)
    mean = _flat(model).clone()
    with pytest.raises(KeyError), opt.sampled_params(train=True):
        assert not torch.equal(_flat(model), mean)
        raise KeyError("boom")
    assert torch.equal(_flat(model), mean)
    with opt.sampled_params():  # usable again
        pass
    assert torch.equal(_flat(model), mean)


def test_nested_sampling_is_refused_and_mean_kept():
    model = _model()
    opt = IVON(model.parameters(), lr=0.1, ess=48)
    mean = _flat(model).clone()
    with pytest.raises(RuntimeError, match="nested"), opt.sampled_params(), opt.sampled_params():
        pass
    assert torch.equal(_flat(model), mean)


def test_closure_step_draws_mc_samples_and_returns_mean_loss():
    x, y = _data()
    model = _model()
    opt = IVON(model.parameters(), lr=0.05, ess=48, mc_samples=3)
    calls = []

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        calls.append(loss.item())
        return loss

    loss = opt.step(closure)
    assert len(calls) == 3
    assert float(loss) == pytest.approx(sum(calls) / 3, rel=1e-6)
    assert opt.current_step == 1


def test_gradient_accumulation_weights_microbatches_by_size():
    """Two micro-batches of sizes 10 and 30, weighted by size, equal one MC sample of each with those weights."""
    x, y = _data(40)
    pieces = [(x[:10], y[:10]), (x[10:], y[10:])]

    def run(weighted):
        model = _model()
        opt = IVON(model.parameters(), lr=0.05, ess=40, beta2=0.9)
        torch.manual_seed(11)
        for _ in range(5):
            for xb, yb in pieces:
                with opt.sampled_params(train=True, weight=len(xb) if weighted else 1.0):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        return model, opt

    model_w, _ = run(True)
    model_u, _ = run(False)
    assert not torch.allclose(_flat(model_w), _flat(model_u))

    # Reference by hand for one step: weights 1/4, 3/4 on the two samples' statistics.
    model = _model()
    opt = IVON(model.parameters(), lr=0.05, ess=40, beta2=0.9)
    torch.manual_seed(11)
    grads, noises = [], []
    for xb, yb in pieces:
        m0 = [p.detach().clone() for p in model.parameters()]
        with opt.sampled_params(train=True, weight=len(xb)):
            noises.append([p.detach() - m for p, m in zip(model.parameters(), m0)])
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    w = opt.state[model[0].weight]
    h0 = w["hess"].clone()
    avg_g = 0.25 * grads[0][0] + 0.75 * grads[1][0]
    avg_nxg = 0.25 * grads[0][0] * noises[0][0] + 0.75 * grads[1][0] * noises[1][0]
    opt.step()
    hhat = 40 * (h0 + 1e-4) * avg_nxg
    expect_h = 0.9 * h0 + 0.1 * hhat + 0.5 * 0.01 * (h0 - hhat) ** 2 / (h0 + 1e-4)
    assert torch.allclose(w["hess"], expect_h, rtol=1e-4, atol=1e-6)
    assert torch.allclose(w["momentum"], 0.1 * avg_g, rtol=1e-5, atol=1e-7)


def test_in_place_zeroing_between_samples_is_detected():
    x, y = _data()
    model = _model()
    opt = IVON(model.parameters(), lr=0.05, ess=48)
    with opt.sampled_params(train=True):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match="changed in place"), opt.sampled_params(train=True):
        pass


def test_gradsq_with_sync_and_no_process_group_works():
    x, y = _data()
    model = _model()
    opt = IVON(model.parameters(), lr=0.05, ess=48, hess_approx="gradsq", sync=True)
    _train_steps(model, opt, 3, x, y)
    assert opt.current_step == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_state_and_learn_h(dtype):
    x, y = _data()
    model = _model().to(dtype)
    opt = IVON(model.parameters(), lr=0.05, ess=48, hess_init=0.5, beta2=0.9)
    _train_steps(model, opt, 10, x.to(dtype), y)
    st = opt.state[model[0].weight]
    assert st["hess"].dtype == torch.float32 and st["momentum"].dtype == torch.float32
    assert model[0].weight.dtype == dtype
    assert (st["hess"] - 0.5).abs().max() > 1e-3  # h moved (a bf16 h at 0.5 could not)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = IVON(model.parameters(), lr=0.05, ess=48, hess_init=0.5, beta2=0.9)
    opt2.load_state_dict(sd)
    assert opt2.state[model[0].weight]["hess"].dtype == torch.float32


def test_state_follows_the_model_after_a_device_or_dtype_move():
    x, y = _data()
    model = _model()
    opt = IVON(model.parameters(), lr=0.05, ess=48)
    _train_steps(model, opt, 2, x, y)
    model.to(torch.float64)  # a move of the parameters in place, as model.to(device) does
    _train_steps(model, opt, 2, x.double(), y)
    assert opt.state[model[0].weight]["hess"].dtype == torch.float64
    if torch.cuda.is_available():
        model.cuda()
        _train_steps(model, opt, 2, x.double().cuda(), y.cuda())
        assert opt.state[model[0].weight]["hess"].is_cuda


def test_state_dict_from_other_layout_is_refused_with_what_differs():
    x, y = _data()
    model = _model()
    opt = IVON(model.parameters(), lr=0.05, ess=48)
    _train_steps(model, opt, 1, x, y)
    other = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    msg = r"parameter 2: state_dict shape \(3, 12\) differs from the parameter's \(4, 12\)"
    with pytest.raises(ValueError, match=msg):
        IVON(other.parameters(), lr=0.05, ess=48).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="state_dict has 4 parameters, this optimizer has 2"):
        IVON(nn.Linear(6, 3).parameters(), lr=0.05, ess=48).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="hess_approx"):
        IVON(_model().parameters(), lr=0.05, ess=48, hess_approx="gradsq").load_state_dict(opt.state_dict())


def test_lr_scheduler_drives_the_learning_rate():
    x, y = _data()
    model = _model()
    opt = IVON(model.parameters(), lr=0.1, ess=48)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    lrs = []
    for _ in range(4):
        _train_steps(model, opt, 1, x, y)
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] < 0.1 and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs == sorted(lrs, reverse=True)


def test_variances_are_inverse_of_ess_times_h_plus_delta():
    model = _model()
    opt = IVON(model.parameters(), lr=0.1, ess=50, hess_init=0.2, weight_decay=0.01)
    for v in opt.variances():
        assert torch.allclose(v, torch.full_like(v, 1 / (50 * 0.21)))


def test_hess_init_share_is_the_median_remainder_of_hess_init():
    model, (x, y) = _model(), _data()
    opt = IVON(model.parameters(), lr=0.05, ess=48, hess_init=0.3, beta2=0.9)
    assert opt.hess_init_share() == 1.0  # before any step h is hess_init
    _train_steps(model, opt, 60, x, y)
    hs = torch.cat([opt.state[p]["hess"].flatten() for p in model.parameters()])
    assert opt.hess_init_share() == pytest.approx(float((0.3 * 0.9**60 / hs).clamp(max=1).median()), rel=1e-6)
    assert opt.hess_init_share() < 0.1  # β2 = 0.9 forgets hess_init within 60 steps
    model2 = _model()
    slow = IVON(model2.parameters(), lr=0.05, ess=48, hess_init=0.3, beta2=0.99999)
    _train_steps(model2, slow, 20, x, y)
    assert slow.hess_init_share() > 0.99  # the default β2 keeps h at hess_init over a short run


def test_hess_init_share_of_a_large_model_reads_a_strided_sample(monkeypatch):
    import ivon_core.optimizer as optimizer_module

    model, (x, y) = _model(), _data()
    opt = IVON(model.parameters(), lr=0.05, ess=48, hess_init=0.3, beta2=0.9)
    _train_steps(model, opt, 25, x, y)
    exact = opt.hess_init_share()
    monkeypatch.setattr(optimizer_module, "SHARE_SAMPLE", 40)  # 123 parameters: every fourth of each tensor
    hs = torch.cat([opt.state[p]["hess"].flatten()[::4] for p in model.parameters()])
    sampled = opt.hess_init_share()
    assert sampled == pytest.approx(float((0.3 * 0.9**25 / hs).clamp(max=1).median()), rel=1e-6)
    assert sampled == pytest.approx(exact, rel=0.3)


def test_samples_have_the_posterior_spread():
    lin = nn.Linear(200, 200)
    opt = IVON(lin.parameters(), lr=0.1, ess=25, hess_init=1.0, weight_decay=0.0)
    mean = lin.weight.detach().clone()
    with opt.sampled_params():
        std = (lin.weight.detach() - mean).std()
    assert float(std) == pytest.approx(0.2, rel=0.02)


def test_parallel_noise_is_reproducible_and_standard_normal():
    from ivon_core.noise import _segments

    tensors = [torch.empty(n) for n in (5, 1000, 3, 77)]
    parts = _segments(tensors, 3)
    assert sum(s.numel() for part in parts for s in part) == 1085
    assert max(sum(s.numel() for s in part) for part in parts) <= 362

    def draw(seed):
        torch.manual_seed(0)
        lin = nn.Linear(300, 300)
        opt = IVON(lin.parameters(), lr=0.1, ess=1.0, hess_init=1.0, weight_decay=0.0, noise_threads=3)
        mean = lin.weight.detach().clone()
        torch.manual_seed(seed)
        with opt.sampled_params():
            return lin.weight.detach() - mean

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.mean()) == pytest.approx(0.0, abs=0.01) and float(a.std()) == pytest.approx(1.0, rel=0.01)
    with pytest.raises(ValueError, match="noise_threads"):
        IVON(nn.Linear(2, 2).parameters(), lr=0.1, ess=1.0, noise_threads=0)


def test_chunks_bound_temporaries_by_a_fraction_with_a_floor_on_accelerators(monkeypatch):
    from ivon_core import _functional as F

    def sizes(device, n, tensors):
        ts = [torch.empty(n, device=device) for _ in range(tensors)]
        return [sum(t.numel() for t in c[0]) for c in F.chunks([ts])]

    assert sizes("cpu", 1 << 18, 64) == [1 << 21] * 8  # chunks of 0.125 of 16M elements
    assert sizes("cpu", 1000, 16) == [16000]  # a small model: one chunk (under the CPU's 1M-element floor)
    monkeypatch.setitem(F._CHUNK_MIN, "cpu", 1)
    assert sizes("cpu", 1000, 16) == [2000] * 8
    # a tensor larger than the budget (ResNet-18: its 2.4M-element conv) is updated in flat pieces, views of it,
    # with its extras repeated; a non-contiguous one stays whole
    ts = [torch.arange(float(n)) for n in (700, 700, 700, 5000, 300, 900, 900, 900, 900, 900, 900, 900, 900)]
    ts.append(torch.zeros(90, 40).T)
    budget = int(sum(t.numel() for t in ts) * 0.125)
    parts = list(F.chunks([ts, [t.clone() for t in ts]], list(range(len(ts)))))
    assert all(sum(t.numel() for t in c[0]) <= budget or len(c[0]) == 1 for c in parts)
    pieces = [(t, x) for c in parts for t, x in zip(c[0], c[2])]
    assert [x for _, x in pieces].count(3) == -(-5000 // budget) == 3
    assert sum(t.numel() for t, x in pieces if x == 3) == 5000
    assert any(t is ts[-1] for t, _ in pieces)  # the transposed one, whole
    for c in parts:
        torch._foreach_add_(c[0], 1.0)
    assert all(torch.equal(t, torch.arange(float(t.numel())) + 1) for t in ts[:-1]) and bool((ts[-1] == 1).all())
    small = sizes("meta", 1 << 20, 11)  # ResNet-18-size on an accelerator: one chunk (launches dominate)
    assert small == [11 << 20]
    large = sizes("meta", 1 << 26, 40)  # 2.7G elements: chunks of about 0.2 of them
    assert len(large) == 5 and sum(large) == 40 << 26 and max(large) <= 0.2 * (40 << 26) + (1 << 26)


LEAN = """
import sys, torch
from ivon_core import IVON
m = torch.nn.Linear(4, 2)
opt = IVON(m.parameters(), lr=0.1, ess=100)
x = torch.randn(8, 4)
def step(x):
    opt.zero_grad()
    loss = m(x).square().mean()
    loss.backward()
    return loss
if sys.argv[1] == "compiled":
    step = torch.compile(step, backend="eager")
for _ in range(2):
    with opt.sampled_params(train=True):
        step(x)
    opt.step()
opt.load_state_dict(opt.state_dict())
opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
print("torch._dynamo" in sys.modules, float(m.weight.abs().sum()) > 0)
"""


@pytest.mark.parametrize(("how", "dynamo"), [("eager", "False"), ("compiled", "True")])
def test_an_eager_loop_never_imports_the_compiler_and_a_compiled_one_still_works(how, dynamo):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LEAN, how], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [dynamo, "True"]
