"""Shared by every pass over the data: chunks of examples, the model as a function of its parameters, and
per-example Jacobians (for the dense forms and Laplace fits; the default passes never materialize them)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap


def iter_chunks(data, chunk_size: int, model: nn.Module) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(inputs, targets, indices) chunks of at most ``chunk_size`` examples from tensors or a loader.

    A loader may yield (inputs, targets) or (inputs, targets, indices); otherwise indices count from 0.
    """
    if chunk_size < 1:
        raise ValueError(f"Invalid chunk_size: {chunk_size!r} (must be >= 1)")
    device = next(model.parameters()).device
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and isinstance(data[0], Tensor):
        batches: object = [tuple(data)]
    else:
        batches = data
    offset = 0
    for batch in batches:
        x, y = batch[0], batch[1]
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs have {x.shape[0]} examples but targets {y.shape[0]} (from example {offset})")
        idx = batch[2] if len(batch) > 2 else torch.arange(offset, offset + x.shape[0])
        offset += x.shape[0]
        for s in range(0, x.shape[0], chunk_size):
            yield x[s : s + chunk_size].to(device), y[s : s + chunk_size].to(device), idx[s : s + chunk_size]


def functional(model: nn.Module, params: dict[str, Tensor]):
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = {**dict(model.named_buffers()), **frozen}

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return out.reshape(-1)

    return f


def per_example_jacobians(model: nn.Module, params: dict[str, Tensor], x: Tensor):
    """Outputs (B, K) and J_iᵀ as a dict name → (B, K, *shape), by K VJPs per example."""
    f = functional(model, params)

    def one(xi: Tensor):
        out, pull = vjp(lambda p: f(p, xi), params)
        eye = torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
        (jac,) = vmap(pull)(eye)
        return out, jac

    return vmap(one)(x)


__all__ = ["iter_chunks", "functional", "per_example_jacobians"]
