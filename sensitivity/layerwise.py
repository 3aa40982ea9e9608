"""Exact deviations layer by layer, without per-example gradients of the whole network.

For a layer with input a and output z, J_iᵀ v restricted to the layer's parameters is its per-example gradient
for the output gradient δ = ∂(vᵀ f_i)/∂z, which needs only a and δ from one batched backward pass:
    Linear (applied once per example)   g_W = δ aᵀ (rank one; never formed with a diagonal or K-FAC Σ)
    Conv2d                              g_W = D_i U_iᵀ, U_i the unfolded input patches, D_i the δ per position
    GroupNorm, BatchNorm2d (eval)       g_γ = Σ_t δ_t ⊙ x̂_t, g_β = Σ_t δ_t  (x̂ the normalized input)
Σ applied to them is turned into the output perturbation u = ∂z/∂θ (Σ g) and all layers' u are pushed to the
outputs by one forward-mode pass: the first-order deviation. For Linear layers the K×K V_i comes from K batched
backward passes without per-example gradients (other layers' V_i goes through per-example Jacobians, faster
there). Covariances must be block diagonal by layer (diagonal, K-FAC); other parameters take the generic route.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn import functional as F

from sensitivity.covariance import BlockCovariance, DenseCovariance, KFACCovariance
from sensitivity.forward_mode import fast_rules, takes_per_example
from sensitivity.variance import DiagonalCovariance


class _Layer:
    """A layer's parameter names; ``ndim``: the input ranks it takes."""

    ndim: tuple[int, ...] = ()

    def __init__(self, name: str, module: nn.Module, cov):
        self.name, self.module, self.cov = name, module, cov
        prefix = f"{name}." if name else ""
        self.wname, self.bname = prefix + "weight", prefix + "bias"
        self.has_bias = module.bias is not None

    def params(self) -> list[str]:
        return [self.wname] + ([self.bname] if self.has_bias else [])


class _Block(_Layer):
    """One Linear layer with its covariance block in a rank-one-friendly form."""

    ndim = (2,)

    def __init__(self, name: str, module: nn.Linear, cov):
        super().__init__(name, module, cov)
        if isinstance(cov, DiagonalCovariance):
            self.kind = "diag"
            self.sw = cov.variances.get(self.wname)
            self.sb = cov.variances.get(self.bname) if self.has_bias else None
        else:
            self.kind = "kfac"
            f = cov.layers[name]
            self.qa, self.qg = f["qa"], f["qg"]
            self.dinv = 1.0 / (f["lg"][:, None] * f["la"][None, :] + f["prior"])

    def weights(self, a: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-example output weights w (B, out) and the output rotation (None for diagonal Σ)."""
        if self.kind == "diag":
            w = a.square() @ self.sw.to(a.dtype).T
            if self.sb is not None:
                w = w + self.sb.to(a.dtype)
            return w, None
        if self.has_bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        ap = a @ self.qa.to(a.dtype)
        return ap.square() @ self.dinv.to(a.dtype).T, self.qg.to(a.dtype)

    def tangent(self, a: Tensor, d: Tensor) -> Tensor:
        w, rot = self.weights(a)
        return d * w if rot is None else ((d @ rot) * w) @ rot.T

    def variance(self, a: Tensor, d: Tensor) -> Tensor:
        """This layer's part of V_i (B, K, K) from the K output gradients ``d`` (K, B, out)."""
        w, rot = self.weights(a)
        if rot is not None:
            d = d @ rot
        d = d.transpose(0, 1)  # (B, K, out)
        return torch.bmm(d * w[:, None, :], d.transpose(1, 2))


class _GradBlock(_Layer):
    """A layer whose per-example gradients are formed from (a, δ); Σ is applied by the covariance itself."""

    def grads(self, a: Tensor, d: Tensor) -> dict[str, Tensor]:  # d: (*lead, B, *z) → (*lead, B, *param)
        raise NotImplementedError

    def push(self, a: Tensor, sg: dict[str, Tensor]) -> Tensor:  # (B, *param) → output perturbation, z's numel
        raise NotImplementedError

    def tangent(self, a: Tensor, d: Tensor) -> Tensor:
        return self.push(a, self.cov.apply(self.grads(a, d))).reshape(d.shape)


class _ConvBlock(_GradBlock):
    """Per-example gradients and output perturbations as one convolution with a group per example."""

    ndim = (4,)

    def _conv_args(self) -> tuple:
        m = self.module
        return list(m.stride), list(m.padding), list(m.dilation)

    def grads(self, a, d):
        b, lead = a.shape[0], d.shape[:-4]
        dd = d.reshape(-1, *d.shape[-3:])  # (R·B, out, H', W')
        n = dd.shape[0]
        if n != b:  # R output directions per example
            a = a.expand(n // b, *a.shape).reshape(n, *a.shape[1:])
        wshape = self.module.weight.shape
        shape_only = torch.empty((), dtype=a.dtype, device=a.device).expand(n * wshape[0], *wshape[1:])
        gw = torch.ops.aten.convolution_backward(
            dd.reshape(1, -1, *dd.shape[-2:]), a.reshape(1, -1, *a.shape[-2:]), shape_only, None, *self._conv_args(),
            False, [0, 0], n, [False, True, False])[1]
        g = {self.wname: gw.reshape(*lead, b, *wshape)}
        if self.has_bias:
            g[self.bname] = dd.sum((-2, -1)).reshape(*lead, b, wshape[0])
        return g

    def push(self, a, sg):
        b, w = a.shape[0], sg[self.wname]
        out = F.conv2d(a.reshape(1, -1, *a.shape[-2:]), w.reshape(-1, *w.shape[2:]), None, *self._conv_args(), b)
        out = out.reshape(b, w.shape[1], *out.shape[-2:])
        if self.has_bias:
            out = out + sg[self.bname][..., None, None]
        return out


class _DenseLinearBlock(_GradBlock):
    """A Linear layer under a dense Σ of its own (e.g. an exact last-layer Laplace): g_W = δ aᵀ per example."""

    ndim = (2,)

    def grads(self, a, d):
        g = {self.wname: d[..., :, None] * a[:, None, :]}
        if self.has_bias:
            g[self.bname] = d
        return g

    def push(self, a, sg):
        out = (sg[self.wname] @ a[:, :, None])[..., 0]
        return out + sg[self.bname] if self.has_bias else out


class _NormBlock(_GradBlock):
    """Per-channel affine after GroupNorm or BatchNorm2d with running statistics (eval)."""

    ndim = (2, 3, 4)

    def _normalized(self, a: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(a, m.num_groups, None, None, m.eps)
        return F.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)

    def grads(self, a, d, xhat: Tensor | None = None):
        xhat = self._normalized(a) if xhat is None else xhat
        if a.ndim == 2:
            g = {self.wname: d * xhat}
        else:  # Σ over positions in one pass, no product tensor
            start = d.ndim - a.ndim + 2
            g = {self.wname: torch.linalg.vecdot(d.flatten(start), xhat.flatten(2))}
        if self.has_bias:
            g[self.bname] = d.flatten(d.ndim - a.ndim + 2).sum(-1) if a.ndim > 2 else d
        return g

    def push(self, a, sg, xhat: Tensor | None = None):
        extra = (1,) * (a.ndim - 2)
        w = sg[self.wname].reshape(*sg[self.wname].shape, *extra)
        xhat = self._normalized(a) if xhat is None else xhat  # None: as the base class calls it
        if self.has_bias:
            return torch.addcmul(sg[self.bname].reshape(*sg[self.bname].shape, *extra), w, xhat)
        return w * xhat

    def tangent(self, a: Tensor, d: Tensor) -> Tensor:
        xhat = self._normalized(a)  # once for both
        return self.push(a, self.cov.apply(self.grads(a, d, xhat)), xhat).reshape(d.shape)

    def param_tangents(self, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor | None]:
        """Σ g per example for (γ, β), each (B, C), for the forward-mode rule to add (``takes_per_example``)."""
        sg = self.cov.apply(self.grads(a, d))
        return sg[self.wname], sg.get(self.bname)


def is_rank_one(block) -> bool:
    """A Linear block: its V_i part needs no per-example gradients."""
    return isinstance(block, _Block)


def _block_for(name: str, m: nn.Module, cov):
    if type(m) is nn.Linear:
        return _DenseLinearBlock(name, m, cov) if isinstance(cov, DenseCovariance) else _Block(name, m, cov)
    if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        if isinstance(cov, KFACCovariance) and name not in cov.layers:
            return None
        return _ConvBlock(name, m, cov)
    if type(m) is nn.GroupNorm and m.affine:
        return _NormBlock(name, m, cov)
    if type(m) is nn.BatchNorm2d and m.affine and m.running_mean is not None:
        return _NormBlock(name, m, cov)
    return None


def _sub_covariance(cov, names: list[str]):
    """The covariance that answers for exactly this layer's ``names`` per layer (diagonal, K-FAC, or a dense Σ of
    this layer alone, possibly as a block of a BlockCovariance), or None."""
    if isinstance(cov, BlockCovariance):
        for block, covers in zip(cov.blocks, cov.covers):
            if set(names) <= set(covers):
                return _sub_covariance(block, names)
        return None
    if isinstance(cov, DenseCovariance):  # only a block of one layer's own: no correlations across layers
        return cov if set(cov.names) == set(names) else None
    return cov if isinstance(cov, (DiagonalCovariance, KFACCovariance)) else None


def _layers(model: nn.Module, params: dict[str, Tensor]):
    """(name, module, its parameter names) for each module with a weight whose parameters are all in ``params``."""
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if getattr(m, "weight", None) is None:
            continue
        names = [prefix + "weight"] + ([prefix + "bias"] if getattr(m, "bias", None) is not None else [])
        if all(n in params for n in names):
            yield name, m, names


def eligible_blocks(model: nn.Module, cov, params: dict[str, Tensor]) -> list:
    """Linear, Conv2d and normalization layers whose parameters are all trainable, under a diagonal or K-FAC Σ
    (or such a block of a ``BlockCovariance``, e.g. the body under IVON's σ² beside a dense last-layer head)."""
    blocks = []
    for name, m, names in _layers(model, params):
        sub = _sub_covariance(cov, names)
        if sub is None or (isinstance(sub, DiagonalCovariance) and names[0] not in sub.variances):
            continue
        if type(m) is nn.Linear and isinstance(sub, KFACCovariance) and name not in sub.layers:
            continue
        block = _block_for(name, m, sub)
        if block is not None:
            blocks.append(block)
    return blocks


def gradient_blocks(model: nn.Module, params: dict[str, Tensor]) -> list:
    """Linear, Conv2d and normalization layers whose parameters are all in ``params``, as blocks that form their
    per-example gradients from (a, δ) (``per_example_grads``); no covariance involved."""
    blocks = []
    for name, m, _ in _layers(model, params):
        if type(m) is nn.Linear:
            blocks.append(_DenseLinearBlock(name, m, None))
        elif (block := _block_for(name, m, None)) is not None:
            blocks.append(block)
    return blocks


def per_example_grads(model: nn.Module, blocks: list, x: Tensor, v) -> tuple[dict[str, Tensor], Tensor]:
    """(J_iᵀ v_i restricted to the blocks' parameters, name → (B, *shape); v) from one batched forward and backward
    pass; ``v``: (B, K), or a function of the logits giving it. Raises ``Reused`` where a layer is applied twice
    per example."""
    logits, seen = forward(model, blocks, x)
    v = (v(logits.detach()) if callable(v) else v).to(logits.dtype).reshape(logits.shape)
    out = {}
    for b, d in zip(blocks, deltas(logits, seen, blocks, v)):
        out.update(b.grads(seen[b.name]["a"], d))
    return out, v


def _with_tangent(out: Tensor, t: Tensor) -> Tensor:
    """``out`` with ``t`` added to its forward-mode tangent (no pass over the primal)."""
    primal, tangent = fwAD.unpack_dual(out)
    return fwAD.make_dual(primal, t if tangent is None else tangent + t)


@contextmanager
def _capture(blocks: list, tangents: dict[str, Tensor] | None = None, copy: bool = False):
    """Record each block's input and output (and add ``tangents`` to its output's tangent, inside a dual level);
    refuse layers called twice. ``copy``: the model goes on with copies, so that its in-place operations
    (``ReLU(inplace=True)`` after a layer) leave the recorded tensors as the layer saw and made them."""
    seen: dict[str, dict] = {}

    def hook(block):
        def fn(mod, inp, out):
            if block.name in seen or inp[0].ndim not in block.ndim:
                raise Reused(block.name)
            if tangents is not None and block.name in tangents:
                out = _with_tangent(out, tangents[block.name])
            a = inp[0].detach()
            seen[block.name] = {"a": a.clone() if copy else a, "z": out, "versions": (a._version, out._version),
                                "copied": copy}
            return out.clone() if copy else out
        return fn

    handles = [b.module.register_forward_hook(hook(b)) for b in blocks]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class Reused(Exception):
    """A layer was applied more than once per example or to inputs of another rank: no per-layer route."""


def forward(model: nn.Module, blocks: list, x: Tensor, copy: bool = False) -> tuple[Tensor, dict[str, dict]]:
    """The logits and each block's input and output, as the layer saw and made them: where the model changed one
    in place afterwards (seen by its version counter), the pass runs again recording copies (``copy``: at once).
    Whether copies were recorded: any ``seen[name]["copied"]``."""
    with torch.enable_grad(), _capture(blocks, copy=copy) as seen:
        logits = model(x)
    if not copy and any((s["a"]._version, s["z"]._version) != s["versions"] for s in seen.values()):
        with torch.enable_grad(), _capture(blocks, copy=True) as seen:
            logits = model(x)
    return logits, seen


def deltas(logits: Tensor, seen: dict[str, dict], blocks: list, v: Tensor) -> list[Tensor]:
    """δ_l = ∂(Σ_i v_iᵀ f_i)/∂z_l for each block; ``v`` (B, K) or batched (R, B, K)."""
    zs = [seen[b.name]["z"] for b in blocks]
    if v.ndim == 3:
        return list(torch.autograd.grad(logits, zs, v, retain_graph=True, is_grads_batched=True))
    # a scalar's backward: explicit output gradients make torch import its symbolic-shapes module (sympy), which the
    # process then holds to its end (bench/memory.py)
    return list(torch.autograd.grad((logits * v).sum(), zs, retain_graph=True))


def first_order(model: nn.Module, blocks: list, x: Tensor, logits: Tensor, seen, e: Tensor) -> Tensor:
    """Σ_blocks J_{f←z} u with u the output perturbation of Σ J_iᵀ e_i (B, K), by one forward-mode pass."""
    tangents, per_example = {}, {}
    for b, d in zip(blocks, deltas(logits, seen, blocks, e)):
        if isinstance(b, _NormBlock) and takes_per_example(b.module):  # added inside its rule: no pass of its own
            per_example[b.module] = b.param_tangents(seen[b.name]["a"], d)
        else:
            tangents[b.name] = b.tangent(seen[b.name]["a"], d)
    with fwAD.dual_level(), torch.no_grad():  # no autograd graph: torch.func.jvp here took 3x longer
        # each block's output is known from the first pass (not where the model changes outputs in place)
        primals = {b.module: seen[b.name]["z"] for b in blocks if not seen[b.name]["copied"]}
        with _capture(blocks, tangents), fast_rules(model, primals, per_example):
            out = fwAD.unpack_dual(model(x)).tangent
    return torch.zeros_like(logits).detach() if out is None else out


def prediction_variance(blocks: list, logits: Tensor, seen) -> Tensor:
    """Σ_blocks V_i (B, K, K) over Linear blocks, from K batched backward passes."""
    b_, k = logits.shape
    eye = torch.eye(k, dtype=logits.dtype, device=logits.device)[:, None, :].expand(k, b_, k)
    v = torch.zeros(b_, k, k, dtype=logits.dtype, device=logits.device)
    for b, d in zip(blocks, deltas(logits, seen, blocks, eye)):  # d: (K, B, *z)
        v += b.variance(seen[b.name]["a"], d)
    return v
