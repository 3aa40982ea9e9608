"""The faster forward-mode rules equal PyTorch's, with and without parameter tangents, and leave no trace."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from sensitivity.forward_mode import fast_rules


def _bn() -> nn.Module:
    m = nn.BatchNorm2d(4)
    m.running_mean.uniform_(-1, 1)
    m.running_var.uniform_(0.5, 2)
    nn.init.uniform_(m.weight, 0.5, 1.5)
    nn.init.uniform_(m.bias)
    return m.eval()


def _gn(groups: int, channels: int) -> nn.Module:
    m = nn.GroupNorm(groups, channels)
    nn.init.uniform_(m.weight, 0.5, 1.5)
    nn.init.uniform_(m.bias)
    return m


LAYERS = {
    "conv": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (3, 4, 9, 9)),
    "conv_grouped_dilated": (lambda: nn.Conv2d(4, 6, 2, dilation=2, groups=2, bias=False), (3, 4, 7, 7)),
    "linear_3d": (lambda: nn.Linear(5, 7), (3, 2, 5)),
    "batchnorm_eval": (_bn, (3, 4, 5, 5)),
    "groupnorm": (lambda: _gn(2, 4), (3, 4, 5, 5)),
    "groupnorm_2d": (lambda: _gn(3, 6), (5, 6)),
    "groupnorm_no_affine": (lambda: nn.GroupNorm(2, 4, affine=False), (3, 4, 5)),
}


def _push(m: nn.Module, x, dx, tangents: dict, fast: bool, primal=None):
    with fwAD.dual_level(), torch.no_grad():
        params = {n: fwAD.make_dual(p, tangents[n]) if n in tangents else p for n, p in m.named_parameters()}
        with fast_rules(m, None if primal is None else {m: primal}) if fast else contextlib.nullcontext():
            out = functional_call(m, params, (fwAD.make_dual(x, dx) if dx is not None else x,))
        primal, tangent = fwAD.unpack_dual(out)
        return primal.clone(), None if tangent is None else tangent.clone()


CASES = [(True, ()), (True, ("weight",)), (True, ("weight", "bias")), (False, ("weight",)), (False, ("bias",))]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize(("with_input", "with_params"), CASES)
def test_rules_equal_pytorchs_in_float64(layer, with_input, with_params):
    make, shape = LAYERS[layer]
    torch.manual_seed(0)
    m = make().double()
    names = [n for n in with_params if getattr(m, n, None) is not None]
    if not with_input and not names:
        names = ["weight"] if m.weight is not None else []
    if not with_input and not names:  # no parameters at all: the input's tangent is the only one there is
        with_input = True
    x = torch.randn(shape, dtype=torch.float64)
    dx = torch.randn_like(x) if with_input else None
    tangents = {n: torch.randn_like(getattr(m, n)) for n in names}
    ref, fast = _push(m, x, dx, tangents, False), _push(m, x, dx, tangents, True)
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[1], ref[1], rtol=0, atol=1e-12)
    # with the output known from an earlier pass: returned as given (not recomputed), the same tangent
    known = ref[0] + 1.0  # distinguishable from a recomputed output
    given = _push(m, x, dx, tangents, True, primal=known)
    assert torch.equal(given[0], known)
    torch.testing.assert_close(given[1], ref[1], rtol=0, atol=1e-12)


def test_rules_leave_the_model_as_it_was_even_after_an_error():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(12, 2), Custom(2, 2))
    own = nn.Linear(2, 2)
    own.forward = lambda x: x  # a user's own instance forward is theirs
    model.append(own)
    with pytest.raises(RuntimeError, match="boom"), fast_rules(model):
        assert "forward" in model[0].__dict__ and "forward" in model[1].__dict__
        assert "forward" not in model[4].__dict__  # subclasses keep their forward: it may differ
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in list(model)[:5])
    assert own.forward(torch.ones(1)).item() == 1.0


def test_training_mode_batchnorm_keeps_pytorchs_rule():
    bn = nn.BatchNorm2d(3).train()
    with fast_rules(bn):
        assert "forward" not in bn.__dict__


def test_empty_batch_pushes_an_empty_tangent():
    m = _gn(2, 4)
    x = torch.randn(0, 4, 3, 3)
    primal, tangent = _push(m, x, torch.randn_like(x), {}, True)
    assert primal.shape == tangent.shape == (0, 4, 3, 3)


@pytest.mark.parametrize("with_input", [True, False])
@pytest.mark.parametrize("layer,shape", [("gn", (3, 6, 4, 5)), ("gn", (3, 6)), ("bn", (3, 6, 4, 5))])
def test_norms_add_per_example_parameter_tangents_in_their_rule(with_input, layer, shape):
    from sensitivity.forward_mode import takes_per_example

    torch.manual_seed(0)
    if layer == "gn":
        m = _gn(3, 6).double()
    else:
        m = nn.BatchNorm2d(6).double()
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        nn.init.uniform_(m.weight, 0.5, 1.5)
        m.eval()
        assert not takes_per_example(nn.BatchNorm2d(6))  # training mode: PyTorch's rule
    x = torch.randn(shape, dtype=torch.float64)
    dx = torch.randn_like(x) if with_input else None
    dw, db = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    assert takes_per_example(m) and not takes_per_example(nn.GroupNorm(3, 6, affine=False))
    with fwAD.dual_level(), torch.no_grad():
        with fast_rules(m, per_example={m: (dw, db)}):
            out = m(fwAD.make_dual(x, dx) if with_input else x)
        tangent = fwAD.unpack_dual(out).tangent
    ref = _push(m, x, dx, {}, False)[1] if with_input else 0
    per = (3, 6) + (1,) * (x.ndim - 2)
    xhat = nn.functional.group_norm(x, 3) if layer == "gn" else \
        nn.functional.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    torch.testing.assert_close(tangent, ref + xhat * dw.view(per) + db.view(per), rtol=0, atol=1e-12)
