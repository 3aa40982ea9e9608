"""First-order LOO scores of a training batch from the step's own activations and output gradients.

Removing example i moves the parameters by ≈ V gᵢ (gᵢ its loss gradient), which raises its own loss by
≈ gᵢᵀ V gᵢ: a first-order LOO loss increase. The training step already holds what gᵢ is made of: a Linear layer's
per-example weight gradient is δᵢ aᵢᵀ (δ the output gradient, a the input), so with a diagonal V
gᵢᵀ V gᵢ = (δᵢ²)ᵀ V (aᵢ²) summed over layers, one small matmul per layer and no per-example gradient; a Conv2d's is
the sum over positions of δ ⊗ unfold(a), formed per example. Other layers' parameters (norms, embeddings) are left
out, and ``covered`` says which share of the parameters counted.

    with BatchScores(model, variance) as bs:       # variance: {name: σ²}, as ivon_variance returns
        loss = F.cross_entropy(model(x), y)        # the mean over the batch, as training computes it
        loss.backward()
    bs.scores                                      # (B,) gᵢᵀ V gᵢ, per example of the batch

Accuracy against the exact sensitivity pass: ``python -m research.batch_scores`` (docs/batch-scores.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BatchScores:
    """Collects gᵢᵀ V gᵢ over the Linear and Conv2d layers of ``model`` during one forward and backward.

    ``batch_mean``: the loss is the mean over the batch (training's default), so the output gradients are scaled
    back by the batch size to per-example gradients."""

    def __init__(self, model: nn.Module, variance: dict[str, Tensor], batch_mean: bool = True):
        self.model, self.variance, self.batch_mean = model, variance, batch_mean
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                       and any(p.requires_grad for p in m.parameters(recurse=False))]
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        mine = sum(p.numel() for _, m in self.layers for p in m.parameters(recurse=False) if p.requires_grad)
        self.covered = mine / max(total, 1)
        self.scores: Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> BatchScores:
        self.scores = None
        for name, m in self.layers:
            self._handles.append(m.register_forward_hook(self._on_forward(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_forward(self, name: str):
        def forward_hook(module: nn.Module, inputs: tuple, out: Tensor) -> None:
            a = inputs[0].detach()

            def on_grad(d: Tensor) -> None:  # the output's gradient, during backward
                d = d.detach() * (d.shape[0] if self.batch_mean else 1)
                part = _linear(module, name, a, d, self.variance) if isinstance(module, nn.Linear) \
                    else _conv(module, name, a, d, self.variance)
                self.scores = part if self.scores is None else self.scores + part

            if out.requires_grad:
                out.register_hook(on_grad)
        return forward_hook


def _linear(m: nn.Linear, name: str, a: Tensor, d: Tensor, var: dict[str, Tensor]) -> Tensor:
    a, d = a.reshape(a.shape[0], -1, a.shape[-1]), d.reshape(d.shape[0], -1, d.shape[-1])
    out = torch.zeros(a.shape[0], dtype=d.dtype, device=d.device)
    if m.weight.requires_grad:
        if a.shape[1] == 1:  # (δ²)ᵀ V (a²): no per-example gradient formed
            out = out + ((d[:, 0] ** 2) @ var[f"{name}.weight"] * a[:, 0] ** 2).sum(1)
        else:  # a sequence: the weight gradient sums over positions, so form it
            g = torch.einsum("bto,bti->boi", d, a)
            out = out + (g ** 2 * var[f"{name}.weight"]).sum((1, 2))
    if m.bias is not None and m.bias.requires_grad:
        out = out + (d.sum(1) ** 2 * var[f"{name}.bias"]).sum(1)
    return out


def _conv(m: nn.Conv2d, name: str, a: Tensor, d: Tensor, var: dict[str, Tensor]) -> Tensor:
    b = a.shape[0]
    out = torch.zeros(b, dtype=d.dtype, device=d.device)
    if m.weight.requires_grad:
        if m.groups != 1:
            raise ValueError(f"layer {name}: grouped convolutions are not supported")
        cols = nn.functional.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        g = torch.einsum("bop,bkp->bok", d.reshape(b, d.shape[1], -1), cols)  # per-example weight gradients
        out = out + (g ** 2 * var[f"{name}.weight"].reshape(1, m.out_channels, -1)).sum((1, 2))
    if m.bias is not None and m.bias.requires_grad:
        out = out + (d.sum((2, 3)) ** 2 * var[f"{name}.bias"]).sum(1)
    return out
