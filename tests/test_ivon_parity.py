"""ivon_core.IVON against the real ivon-opt 0.1.3: the same numbers for the same seed, the posterior readable the
ivon-opt way, checkpoints both ways, ivon-opt-style closures and argument types."""

import numpy as np
import pytest
import torch

ivon = pytest.importorskip("ivon")

from ivon_core import IVON  # noqa: E402
from sensitivity import ivon_variance  # noqa: E402


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def _convnet():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))


def _groups(model, two_groups):
    ps = list(model.parameters())
    if not two_groups:
        return [{"params": ps}]
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "ess": 200.0}]


def _data(model, dtype):
    shape = (32, 3, 8, 8) if isinstance(model[0], torch.nn.Conv2d) else (64, 8)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    return x, torch.randint(0, 3, (shape[0],), generator=torch.Generator().manual_seed(4))


def _steps(model, opt, steps, x, y, seed=1):
    torch.manual_seed(seed)
    for _ in range(steps):
        for _ in range(opt.mc_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _train(cls, dtype=torch.float32, steps=200, make=_mlp, two_groups=False, **kw):
    model = make(dtype) if make is _mlp else make().to(dtype)
    args = dict(lr=0.05, ess=64, hess_init=0.5, beta2=0.999)
    args.update(kw)
    opt = cls(_groups(model, two_groups), **args)
    _steps(model, opt, steps, *_data(model, dtype))
    return model, opt


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


CASES = {
    "defaults": {}, "rescale_lr_off": {"rescale_lr": False}, "debias_off": {"debias": False},
    "clip_radius": {"clip_radius": 0.01}, "gradsq": {"hess_approx": "gradsq"}, "weight_decay_0": {"weight_decay": 0.0},
    "weight_decay_0.05": {"weight_decay": 0.05}, "beta1_0": {"beta1": 0.0}, "mc_samples_3": {"mc_samples": 3},
    "two_groups": {"two_groups": True}, "beta2_1": {"beta2": 1.0},
}
OURS = {"noise_threads_1": {"noise_threads": 1}, "noise_threads_4": {"noise_threads": 4}, "default": {}}


# the draw's thread count matters to the noise alone: varied on the defaults and on two groups, not on every case
PAIRS = [(case, ours) for case in CASES for ours in (OURS if case in ("defaults", "two_groups") else ["default"])]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("case,ours", PAIRS)
def test_the_same_seed_gives_ivon_opts_weights_and_hessian(case, dtype, tol, ours):
    ref_model, ref_opt = _train(ivon.IVON, dtype, **CASES[case])
    model, opt = _train(IVON, dtype, **CASES[case], **OURS[ours])
    assert opt.noise == "torch"
    assert _rel(_flat(model), _flat(ref_model)) <= tol
    ref_h = torch.cat([g["hess"] for g in ref_opt.param_groups])
    # h from (θ − m) ⊙ ĝ where ivon-opt keeps σε: float32 rounds θ − m to m's precision
    assert _rel(torch.cat([g["hess"] for g in opt.param_groups]), ref_h) <= 10 * tol
    assert opt.current_step == ref_opt.current_step == 200


def test_a_two_group_conv_net_follows_ivon_opt_for_120_steps():
    kw = dict(steps=120, make=_convnet, two_groups=True, lr=0.1, ess=500, hess_init=0.1)
    ref_model, _ = _train(ivon.IVON, **kw)
    model, _ = _train(IVON, noise_threads=4, **kw)
    assert _rel(_flat(model), _flat(ref_model)) <= 1e-6


def _sigma2_the_mpe_way(optimizer):
    """σ² read from ``param_groups`` as the memory-perturbation authors' scripts read ivon-opt's."""
    out = []
    for group in optimizer.param_groups:
        std = 1 / (group["ess"] * (group["hess"] + group["weight_decay"])).sqrt()
        offset = 0
        for p in group["params"]:
            if p.requires_grad:
                out.append(std[offset : offset + p.numel()] ** 2)
                offset += p.numel()
        assert offset == group["numel"]
    return torch.cat(out)


def test_param_groups_expose_the_posterior_as_ivon_opt_does_and_stay_in_sync():
    ref_model, ref_opt = _train(ivon.IVON, two_groups=True, steps=50)
    model, opt = _train(IVON, two_groups=True, steps=50)
    sigma2 = _sigma2_the_mpe_way(opt)
    assert _rel(sigma2, _sigma2_the_mpe_way(ref_opt)) <= 1e-6
    assert torch.allclose(sigma2, torch.cat([v.flatten() for v in opt.variances()]), rtol=1e-6, atol=0)
    assert torch.allclose(sigma2, torch.cat([v.flatten() for v in ivon_variance(opt)]), rtol=1e-6, atol=0)
    for key in ("numel", "mc_samples", "lr", "ess", "hess_init", "beta1", "beta2", "weight_decay", "clip_radius"):
        assert [g[key] for g in opt.param_groups] == [g[key] for g in ref_opt.param_groups], key
    assert (opt._numel, opt._device, opt._dtype) == (ref_opt._numel, ref_opt._device, ref_opt._dtype)
    # the flat vectors are the state itself: a step moves both, a write to one is seen by the other
    group = opt.param_groups[0]
    before = group["hess"].clone()
    _steps(model, opt, 1, *_data(model, torch.float32))
    first = group["params"][0]
    assert not torch.equal(group["hess"], before)
    assert torch.equal(group["hess"][: first.numel()], opt.state[first]["hess"].flatten())
    group["hess"].fill_(2.0)
    assert torch.equal(opt.state[first]["hess"], torch.full_like(first, 2.0))
    assert torch.equal(group["momentum"][: first.numel()], opt.state[first]["momentum"].flatten())


def test_an_ivon_opt_checkpoint_resumes_here_with_its_hessian_momentum_and_step():
    x, y = _data(_mlp(), torch.float32)
    ref_model, ref_opt = _train(ivon.IVON, steps=100, two_groups=True)
    saved = ref_opt.state_dict()
    model = _mlp()
    model.load_state_dict(ref_model.state_dict())
    opt = IVON(_groups(model, True), lr=0.05, ess=64, hess_init=0.5, beta2=0.999)
    with pytest.raises(ValueError, match="current_step"):
        opt.load_state_dict(saved)
    saved["current_step"] = ref_opt.current_step
    opt.load_state_dict(saved)
    assert opt.current_step == 100
    assert torch.equal(torch.cat([g["hess"] for g in opt.param_groups]),
                       torch.cat([g["hess"] for g in ref_opt.param_groups]))
    _steps(ref_model, ref_opt, 100, x, y, seed=7)
    _steps(model, opt, 100, x, y, seed=7)
    assert _rel(_flat(model), _flat(ref_model)) <= 1e-6
    assert opt.current_step == 200 and opt.state_dict()["state"]  # saves in this package's layout


def test_a_checkpoint_saved_here_resumes_in_ivon_opt():
    x, y = _data(_mlp(), torch.float32)
    model, opt = _train(IVON, steps=100, two_groups=True)
    saved = opt.ivon_opt_state_dict()
    ref_model = _mlp()
    ref_model.load_state_dict(model.state_dict())
    ref_opt = ivon.IVON(_groups(ref_model, True), lr=0.05, ess=64, hess_init=0.5, beta2=0.999)
    ref_opt.load_state_dict(saved)
    ref_opt.current_step = saved["current_step"]
    _steps(ref_model, ref_opt, 100, x, y, seed=7)
    _steps(model, opt, 100, x, y, seed=7)
    assert _rel(_flat(model), _flat(ref_model)) <= 1e-6


def test_ivon_opt_checkpoints_that_cannot_be_mapped_are_refused_with_the_reason():
    x, y = _data(_mlp(), torch.float32)
    ref_model, ref_opt = _train(ivon.IVON, steps=3)
    with ref_opt.sampled_params(train=True):  # a sample not yet applied by step()
        torch.nn.functional.cross_entropy(ref_model(x), y).backward()
    opt = IVON(_mlp().parameters(), lr=0.05, ess=64)
    with pytest.raises(ValueError, match="1 gradient sample"):
        opt.load_state_dict(ref_opt.state_dict())
    _, other = _train(ivon.IVON, steps=3, make=_convnet)
    saved = other.state_dict()
    saved["current_step"] = 3
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(saved)
    undebiased = IVON(_mlp().parameters(), lr=0.05, ess=64, debias=False)  # the step does not matter there
    _, fresh = _train(ivon.IVON, steps=3, debias=False)
    undebiased.load_state_dict(fresh.state_dict())
    assert undebiased.current_step == 0


def test_frozen_parameters_load_from_ivon_opt_and_hold_no_state():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    ref_opt = ivon.IVON(model.parameters(), lr=0.05, ess=64)
    saved = ref_opt.state_dict()
    saved["current_step"] = 0
    opt = IVON(model.parameters(), lr=0.05, ess=64)
    opt.load_state_dict(saved)
    assert model[0].bias not in opt.state or not opt.state[model[0].bias]
    assert opt.param_groups[0]["numel"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_closure_written_for_ivon_opt_trains_as_in_ivon_opt():
    def run(cls):
        model = _mlp()
        opt = cls(model.parameters(), lr=0.05, ess=64, hess_init=0.5, mc_samples=2)
        x, y = _data(model, torch.float32)

        def closure():
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
            return loss

        torch.manual_seed(1)
        losses = [float(opt.step(closure)) for _ in range(50)]
        return model, losses

    ref_model, ref_losses = run(ivon.IVON)
    model, losses = run(IVON)
    assert _rel(_flat(model), _flat(ref_model)) <= 1e-6
    assert np.allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.parametrize("lr,ess", [(np.float32(0.05), np.int64(64)), (torch.tensor(0.05), torch.tensor(64.0)),
                                    (np.float64(0.05), 64)])
def test_hyperparameters_as_numpy_scalars_and_tensors_as_ivon_opt_takes_them(lr, ess):
    model, opt = _train(IVON, steps=20, lr=lr, ess=ess)
    ref_model, _ = _train(ivon.IVON, steps=20, lr=0.05, ess=64)
    assert isinstance(opt.param_groups[0]["lr"], float)
    assert _rel(_flat(model), _flat(ref_model)) <= 1e-6


def test_beta1_of_one_keeps_the_momentum_at_zero_and_the_weights_finite():
    model, opt = _train(IVON, steps=20, beta1=1.0)
    assert torch.isfinite(_flat(model)).all()
    assert all(float(g["momentum"].abs().max()) == 0.0 for g in opt.param_groups)


def test_a_state_saved_when_torch_noise_drew_in_blocks_resumes_drawing_the_same():
    x, y = _data(_mlp(), torch.float32)
    ref = _mlp()
    ref_opt = IVON(ref.parameters(), lr=0.05, ess=64, noise="blocks", noise_threads=2)
    _steps(ref, ref_opt, 10, x, y)
    saved = ref_opt.state_dict()
    saved["ivon"] = {k: v for k, v in saved["ivon"].items() if k != "format"}  # as the earlier layout wrote it
    saved["ivon"]["noise_kind"] = "torch"
    model = _mlp()
    model.load_state_dict(ref.state_dict())
    opt = IVON(model.parameters(), lr=0.05, ess=64)
    opt.load_state_dict(saved)
    assert opt.noise == "blocks"
    _steps(ref, ref_opt, 5, x, y, seed=9)
    _steps(model, opt, 5, x, y, seed=9)
    assert torch.equal(_flat(model), _flat(ref))
