"""Exact deviations for Linear layers without per-example gradients.

For a Linear layer z = W a + b applied once per example, J_iᵀ v restricted to (W, b) is (δ aᵀ, δ) with
δ = ∂(vᵀ f_i)/∂z, so with a diagonal Σ (σ²_W, σ²_b):
    output perturbation of Σ J_iᵀ v:   u = δ ⊙ (σ²_W a² + σ²_b)           (one GEMM over the batch)
    block of V_i:                      V_kl = Σ_o δ^k_o δ^l_o (σ²_W a² + σ²_b)_o
and with K-FAC's Σ = Q (Λ_G ⊗ Λ_A + prior)^{-1} Qᵀ the same holds in the factors' eigenbases. The first-order
deviation is then one backward pass to the layer outputs and one forward-mode pass, the K×K V_i K backward
passes (batched); nothing of size B × P is formed. Parameters of other layers go through the generic route.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import jvp

from sensitivity.covariance import KFACCovariance
from sensitivity.variance import DiagonalCovariance


class _Block:
    """One Linear layer with its covariance block in a rank-one-friendly form."""

    def __init__(self, name: str, module: nn.Linear, cov):
        self.name, self.module = name, module
        prefix = f"{name}." if name else ""
        self.wname, self.bname = prefix + "weight", prefix + "bias"
        self.has_bias = module.bias is not None
        if isinstance(cov, DiagonalCovariance):
            self.kind = "diag"
            self.sw = cov.variances.get(self.wname)
            self.sb = cov.variances.get(self.bname) if self.has_bias else None
        else:
            self.kind = "kfac"
            f = cov.layers[name]
            self.qa, self.qg = f["qa"], f["qg"]
            self.dinv = 1.0 / (f["lg"][:, None] * f["la"][None, :] + f["prior"])

    def params(self) -> list[str]:
        return [self.wname] + ([self.bname] if self.has_bias else [])

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


def eligible_blocks(model: nn.Module, cov, params: dict[str, Tensor]) -> list[_Block]:
    """Linear layers whose parameters are all trainable and covered by a diagonal or K-FAC covariance."""
    if not isinstance(cov, (DiagonalCovariance, KFACCovariance)):
        return []
    blocks = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        prefix = f"{name}." if name else ""
        names = [prefix + "weight"] + ([prefix + "bias"] if m.bias is not None else [])
        if not all(n in params for n in names):
            continue
        if isinstance(cov, DiagonalCovariance) and prefix + "weight" not in cov.variances:
            continue
        if isinstance(cov, KFACCovariance) and name not in cov.layers:
            continue
        blocks.append(_Block(name, m, cov))
    return blocks


@contextmanager
def _capture(blocks: list[_Block], eps: dict[str, Tensor] | None = None):
    """Record each block's input and output (and add ``eps`` to its output); refuse layers called twice."""
    seen: dict[str, dict] = {}

    def hook(block):
        def fn(mod, inp, out):
            if block.name in seen:
                raise Reused(block.name)
            if inp[0].ndim != 2:
                raise Reused(block.name)
            if eps is not None:
                out = out + eps[block.name]
            seen[block.name] = {"a": inp[0].detach(), "z": out}
            return out
        return fn

    handles = [b.module.register_forward_hook(hook(b)) for b in blocks]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class Reused(Exception):
    """A Linear layer was applied more than once per example or to non-2D inputs: not rank one."""


def forward(model: nn.Module, blocks: list[_Block], x: Tensor) -> tuple[Tensor, dict[str, dict]]:
    with torch.enable_grad(), _capture(blocks) as seen:
        logits = model(x)
    return logits, seen


def deltas(logits: Tensor, seen: dict[str, dict], blocks: list[_Block], v: Tensor) -> list[Tensor]:
    """δ_l = ∂(Σ_i v_iᵀ f_i)/∂z_l for each block; ``v`` (B, K) or batched (R, B, K)."""
    zs = [seen[b.name]["z"] for b in blocks]
    batched = v.ndim == 3
    return list(torch.autograd.grad(logits, zs, v, retain_graph=True, is_grads_batched=batched))


def first_order(model: nn.Module, blocks: list[_Block], x: Tensor, logits: Tensor, seen, e: Tensor) -> Tensor:
    """Σ_blocks J_{f←z} u with u the output perturbation of Σ J_iᵀ e_i (B, K)."""
    tangents = {}
    for b, d in zip(blocks, deltas(logits, seen, blocks, e)):
        w, rot = b.weights(seen[b.name]["a"])
        tangents[b.name] = d * w if rot is None else ((d @ rot) * w) @ rot.T

    def g(eps: dict[str, Tensor]) -> Tensor:
        with _capture(blocks, eps):
            return model(x)

    zeros = {k: torch.zeros_like(t) for k, t in tangents.items()}
    _, out = jvp(g, (zeros,), (tangents,))
    return out.detach()


def prediction_variance(blocks: list[_Block], logits: Tensor, seen) -> Tensor:
    """Σ_blocks V_i (B, K, K) from K batched backward passes."""
    b_, k = logits.shape
    eye = torch.eye(k, dtype=logits.dtype, device=logits.device)[:, None, :].expand(k, b_, k)
    v = torch.zeros(b_, k, k, dtype=logits.dtype, device=logits.device)
    for b, d in zip(blocks, deltas(logits, seen, blocks, eye)):  # d: (K, B, out)
        w, rot = b.weights(seen[b.name]["a"])
        if rot is not None:
            d = d @ rot
        d = d.transpose(0, 1)  # (B, K, out)
        v += torch.bmm(d * w[:, None, :], d.transpose(1, 2))
    return v

