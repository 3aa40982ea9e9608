"""Predictive posterior: MC-averaged predictive probabilities from IVON's Gaussian posterior."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ivon_core.optimizer import IVON

# inputs per forward pass: images' activations are large, and chunks of them beyond this spill the caches (and
# hold more memory: bench/memory.py)
CHUNK, IMAGE_CHUNK = 256, 128


@dataclass
class Prediction:
    """Predictive probabilities (N, K): ``mc`` averaged over posterior samples, ``mean`` at the posterior mean."""

    mc: Tensor
    mean: Tensor
    targets: Tensor | None = None


def _batches(data) -> Iterable[tuple[Tensor, Tensor | None]]:
    if isinstance(data, Tensor):
        yield data, None
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        yield data[0], data[1]
    else:  # a DataLoader or any iterable of (inputs, targets)
        for batch in data:
            yield batch[0], batch[1] if len(batch) > 1 else None


@torch.no_grad()
def mean_probs(model: nn.Module, x: Tensor) -> Tensor:
    """softmax(f(x; m)) at the model's current weights, in eval mode for the call (restored after)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"mean_probs: x must be a tensor of inputs, got {type(x).__name__}")
    was_training = model.training
    model.eval()
    try:
        return _probs(model, [x])
    finally:
        model.train(was_training)


def _probs(model: nn.Module, inputs: list[Tensor], out: Tensor | None = None) -> Tensor:
    """Softmax outputs over ``inputs`` in chunks (faster than one forward over thousands: cache), added into one
    tensor (``out``, or a new one of zeros): a list of small outputs kept between each chunk's large activations
    would pin the heap's freed pages."""
    i = 0
    for x in inputs:
        for c in x.split(IMAGE_CHUNK if x.dim() == 4 else CHUNK):
            p = torch.softmax(model(c).float(), -1)
            if out is None:
                out = torch.zeros(sum(len(x) for x in inputs), p.shape[-1], device=p.device)
            out[i : i + len(p)] += p
            i += len(p)
    if out is None:  # no rows
        out = torch.zeros(0, 0)
    return out


@torch.no_grad()
def predict(model: nn.Module, data, optimizer: IVON, mc_samples: int = 10) -> Prediction:
    """p(y|x) ≈ (1/S) Σ_s softmax(f(x; θ_s)), θ_s ~ q, and softmax(f(x; m)), for inputs, (inputs, targets) or a loader.

    The model is put in eval mode for the call and restored after; the mean is untouched.
    """
    if mc_samples < 1:
        raise ValueError(f"Invalid mc_samples: {mc_samples!r} (must be >= 1)")
    was_training = model.training
    model.eval()
    batches = list(_batches(data))
    try:
        device = next(model.parameters()).device
        inputs = [x.to(device) for x, _ in batches]
        if not inputs:
            empty = torch.empty(0, 0)
            return Prediction(mc=empty, mean=empty, targets=None)

        mean = _probs(model, inputs)
        mc = torch.zeros_like(mean)
        for _ in range(mc_samples):
            with optimizer.sampled_params(train=False):
                _probs(model, inputs, mc)
        mc /= mc_samples
    finally:
        model.train(was_training)
    targets = [y for _, y in batches if y is not None]
    return Prediction(mc=mc.cpu(), mean=mean.cpu(), targets=torch.cat(targets).cpu() if targets else None)


@contextmanager
def preserved_noise(optimizer: IVON) -> Iterator[None]:
    """Sample inside (``predict``, an evaluation's MC metrics) without moving the noise that later training steps
    draw: torch's generators (CPU and the optimizer's GPUs) and the optimizer's own (per rank, parallel blocks, the
    counter's pending keys) are restored on exit.
    So evaluating every 10 steps or every 50 leaves the trained weights the same."""
    gens = {d: g.get_state() for d, g in optimizer._generators.items()}
    blocks = optimizer._noise.state()  # noise="blocks": its parallel generators
    pending = optimizer._next_keys  # noise="counter": the next training sample's keys (drawn again from them)
    devices = sorted({p.device for g in optimizer.param_groups for p in g["params"] if p.device.type == "cuda"},
                     key=str)
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for d, state in gens.items():
                optimizer._generators[d].set_state(state)
            optimizer._noise.load(blocks)
            optimizer._next_keys = pending
