"""Forward-mode rules faster than PyTorch's for the layers a sensitivity pass pushes tangents through.

In a sensitivity pass only activations carry tangents, never parameters. PyTorch's rules still pay for parameter
tangents as zero tensors: a convolution's JVP runs three convolutions (the primal, the input's tangent, and one
with a zero weight), a Linear's two extra matrix products; its GroupNorm JVP is a composite of a dozen elementwise
passes (42% of the forward-mode time of a GroupNorm ResNet-20). The rules here skip absent tangents and fuse the
normalization's (exact: equal to PyTorch's in float64 to rounding, tested).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn


def _total(parts: list[Tensor], like: Tensor) -> Tensor:
    """The sum of a rule's tangent parts (some broadcast per channel), shaped like the output."""
    out = parts[0] if parts[0].shape == like.shape else parts[0].expand_as(like).clone()
    for part in parts[1:]:
        out = out + part
    return out


class _GroupNorm(torch.autograd.Function):
    """y = γ x̂ + β; ẏ = γ r (ẋ − mean_g ẋ − x̂ mean_g(x̂ ẋ)) + γ̇ x̂ + β̇, r = 1/σ per example and group."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                primal: Tensor | None = None, per_example: tuple | None = None) -> Tensor:
        n, c = x.shape[:2]
        xhat, _, rstd = torch.native_group_norm(x, None, None, n, c, math.prod(x.shape[2:]), groups, eps)
        ctx.set_materialize_grads(False)  # absent tangents come as None, not as zeros to multiply
        ctx.save_for_forward(xhat, rstd, weight)
        ctx.groups = groups
        ctx.per_example = per_example
        if primal is not None:
            return primal.detach()
        shape = (1, c) + (1,) * (x.ndim - 2)
        out = xhat if weight is None else xhat * weight.view(shape)
        return out if bias is None else out + bias.view(shape)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dw: Tensor | None, db: Tensor | None, *_) -> Tensor:
        xhat, rstd, weight = ctx.saved_tensors
        n, c, g = xhat.shape[0], xhat.shape[1], ctx.groups
        shape = (1, c) + (1,) * (xhat.ndim - 2)
        # per-example tangents of γ and β (n, c): folded into the input's rule for free (the rule's forward gives
        # the input a zero tangent where it has none)
        dw_i, db_i = ctx.per_example or (None, None)
        parts = []
        if dx is not None:
            hw = math.prod(xhat.shape[2:])
            t, xh = dx.reshape(n, g, c // g, hw), xhat.reshape(n, g, c // g, hw)
            size = t.shape[2] * hw
            m1 = t.sum((2, 3), keepdim=True) / size
            m2 = torch.linalg.vecdot(t.flatten(2), xh.flatten(2))[..., None, None] / size
            scale = rstd.view(n, g, 1, 1)
            if weight is not None:
                scale = scale * weight.view(1, g, c // g, 1)
            const, coef = -(m1 * scale), -(m2 * scale)
            if db_i is not None:
                const = const + db_i.reshape(n, g, c // g, 1)
            if dw_i is not None:
                coef = coef + dw_i.reshape(n, g, c // g, 1)
            parts.append(torch.addcmul(const, t, scale).addcmul_(xh, coef).view_as(xhat))
        if dw is not None:
            parts.append(xhat * dw.view(shape))
        if db is not None:
            parts.append(db.view(shape))
        return _total(parts, xhat)


class _Affine(torch.autograd.Function):
    """A layer affine in its input and its parameters, y = L_W(x) + b: ẏ = L_W(ẋ) + L_Ẇ(x) + ḃ."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, op, primal: Tensor | None = None) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(x, weight)
        ctx.op = op
        out = op(x, weight, bias) if primal is None else primal.detach()
        ctx.out_shape = out.shape
        return out

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dw: Tensor | None, db: Tensor | None, *_) -> Tensor:
        x, weight = ctx.saved_tensors
        out = None if dx is None else ctx.op(dx, weight, None)
        if dw is not None:
            part = ctx.op(x, dw, None)
            out = part if out is None else out + part
        if out is None:
            out = x.new_zeros(ctx.out_shape)
        return out if db is None else ctx.op.bias(out, db)


class _LinearOp:
    def __call__(self, x, w, b):
        return torch.nn.functional.linear(x, w, b)

    @staticmethod
    def bias(out, b):
        return out + b


class _ConvOp:
    def __init__(self, m: nn.Conv2d):
        self.args = (m.stride, m.padding, m.dilation, m.groups)

    def __call__(self, x, w, b):
        return torch.nn.functional.conv2d(x, w, b, *self.args)

    @staticmethod
    def bias(out, b):
        return out + b.view(1, -1, *([1] * (out.ndim - 2)))


class _BatchNormEval(torch.autograd.Function):
    """With running statistics: y = (x − μ) r γ + β, ẏ = ẋ r γ + (x − μ) r γ̇ + β̇."""

    @staticmethod
    def forward(ctx, x: Tensor, weight, bias, mean: Tensor, var: Tensor, eps: float,
                primal: Tensor | None = None, per_example: tuple | None = None) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(x, weight, mean, var)
        ctx.eps = eps
        ctx.per_example = per_example
        if primal is not None:
            return primal.detach()
        return torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def jvp(ctx, dx, dw, db, *_) -> Tensor:
        x, weight, mean, var = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.ndim - 2)
        r = torch.rsqrt(var + ctx.eps)
        parts = []
        if dx is not None and ctx.per_example is not None:  # + x̂ γ̇_i + β̇_i, x̂ = (x − μ) r: two passes in all
            dw_i, db_i = ctx.per_example
            per = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
            coef = (r * dw_i).reshape(per)
            const = -(mean.view(shape) * coef) + (0 if db_i is None else db_i.reshape(per))
            parts.append(torch.addcmul(const, dx, (r if weight is None else r * weight).view(shape))
                         .addcmul_(x, coef))
        elif dx is not None:
            parts.append(dx * (r if weight is None else r * weight).view(shape))
        if dw is not None:
            parts.append((x - mean.view(shape)) * (r * dw).view(shape))
        if db is not None:
            parts.append(db.view(shape))
        return _total(parts, x)


def takes_per_example(m: nn.Module) -> bool:
    """Whether ``fast_rules`` adds per-example tangents of this layer's parameters (``per_example``)."""
    if "forward" in m.__dict__:
        return False
    if type(m) is nn.GroupNorm:
        return m.affine
    return type(m) is nn.BatchNorm2d and m.affine and not m.training and m.running_mean is not None


def _with_input_tangent(x: Tensor) -> Tensor:
    # forward AD calls a rule only for an input with a tangent; per-example parameter tangents need the call
    return fwAD.make_dual(x, torch.zeros_like(x)) if fwAD.unpack_dual(x).tangent is None else x


def _rule(m: nn.Module, primal: Tensor | None = None, per_example: tuple | None = None):
    """The faster forward for ``m``, or None where PyTorch's rules stay (other layers, training-mode norms).
    ``primal``: the layer's output, known from an earlier pass on the same input; returned, not recomputed.
    ``per_example``: a norm layer's per-example tangents of (γ, β), each (B, C), added to its output's tangent."""
    t = type(m)
    if t is nn.GroupNorm:
        return lambda x: _GroupNorm.apply(_with_input_tangent(x) if per_example is not None else x, m.weight,
                                          m.bias, m.num_groups, m.eps, primal, per_example)
    if t is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        op = _ConvOp(m)
        return lambda x: _Affine.apply(x, m.weight, m.bias, op, primal)
    if t is nn.Linear:
        op = _LinearOp()
        return lambda x: _Affine.apply(x, m.weight, m.bias, op, primal)
    if t is nn.BatchNorm2d and not m.training and m.running_mean is not None:
        return lambda x: _BatchNormEval.apply(_with_input_tangent(x) if per_example is not None else x, m.weight,
                                              m.bias, m.running_mean, m.running_var, m.eps, primal, per_example)
    return None


@contextmanager
def fast_rules(model: nn.Module, primals: dict[nn.Module, Tensor] | None = None,
               per_example: dict[nn.Module, tuple] | None = None):
    """Inside: the model's Conv2d, Linear, GroupNorm and eval BatchNorm2d layers push tangents by the rules above
    (for a forward-mode pass only). ``primals``: outputs of layers called once per pass, from an earlier pass on the
    same input (the layer's primal work is skipped: ResNet-20, a third of the forward-mode pass). ``per_example``:
    per layer that ``takes_per_example``, its parameters' tangents per example (B, C each, or None)."""
    primals, per_example = primals or {}, per_example or {}
    patched = []
    for m in model.modules():
        rule = None if "forward" in m.__dict__ else _rule(m, primals.get(m), per_example.get(m))
        if rule is not None:
            m.forward = rule
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
