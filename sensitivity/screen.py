"""Screening: the sensitivities of a model's output layer alone, for many examples at about a forward's cost.

The exact pass needs a per-example gradient and a JVP through the whole network (about two epochs' arithmetic for
every example). A model whose output is a Linear layer's, f = W a + b, has an output layer whose part of
Σ is cheap to use exactly: its inputs a come from one forward under ``no_grad`` and the same forms (first order,
Rayleigh, ...) run on the layer alone. The result leaves out the rest of the network's share of V_i, so its scores
rank like the exact pass's only where the output layer holds most of the variance a prediction has (a CNN with a
wide linear head: most of its parameters; a ResNet's 64-wide head: little). How well it ranks is measured, never
assumed: the worker compares it with the exact pass on each evaluation's slice and uses it only where they agree
(``worker.cadence``; docs/usage.md).

    res = screen(model, rows, variance, form="first_order")   # a SensitivityResult over the output layer's Σ
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sensitivity.deviations import compute_sensitivities
from sensitivity.result import SensitivityResult
from sensitivity.variance import DiagonalCovariance


def output_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last Linear module and its name (whether it makes the output is checked on data: ``screen``)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("screening needs a model whose output is a Linear layer's; this one has no Linear layer")
    return found[-1]


def layer_variance(model: nn.Module, variance, name: str) -> dict[str, Tensor] | None:
    """The output layer's σ² by its own parameter names ("weight", "bias"), or None where Σ is not diagonal (a
    dense or K-FAC covariance couples the layer to the rest: screening does not apply)."""
    if isinstance(variance, DiagonalCovariance):
        variance = variance.variances
    elif not isinstance(variance, Mapping):
        if isinstance(variance, (list, tuple)):
            variance = dict(zip((n for n, _ in model.named_parameters()), variance))
        else:
            return None
    prefix = f"{name}." if name else ""
    out = {k[len(prefix):]: v for k, v in variance.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
    return out or None


def _inputs(model: nn.Module, layer: nn.Linear, data: Iterable) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(the output layer's inputs, targets, indices) chunk by chunk, checking that the layer makes the output."""
    got: dict[str, Tensor] = {}
    # images in channels-last layout, weights to match: the same arithmetic, faster convolutions on CPU
    state = {n: _layout(t.detach()) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    handle = layer.register_forward_hook(lambda m, i, o: got.update(a=i[0], out=o))
    try:
        for offset, batch in _numbered(data):
            x, y, idx = batch
            got.clear()
            with torch.no_grad():
                out = functional_call(model, state, (_layout(x),))
            if "out" not in got or not (got["out"] is out or torch.equal(got["out"], out)):
                raise ValueError("screening needs a model whose output is its last Linear layer's; this model's "
                                 "output is computed after it")
            yield got["a"].detach(), y, idx if idx is not None else torch.arange(offset, offset + len(y))
    finally:
        handle.remove()


def _layout(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _numbered(data: Iterable) -> Iterator[tuple[int, tuple]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        data = [(data[0], data[1], None)]
    offset = 0
    for batch in data:
        x, y, *rest = batch
        yield offset, (x, y, rest[0] if rest else None)
        offset += len(y)


def screen(model: nn.Module, data, variance, *, form: str = "first_order", chunk_size: int = 1024,
           max_amplification: float | str | None = "auto", loss: str = "cross_entropy") -> SensitivityResult:
    """Sensitivities over the output layer's share of Σ (diagonal: σ² by name, a sequence, or
    ``DiagonalCovariance``). ``data``: (inputs, targets) or an iterable of (inputs, targets[, indices]) chunks."""
    name, layer = output_layer(model)
    var = layer_variance(model, variance, name)
    if var is None:
        raise ValueError("screening needs a diagonal variance (IVON's σ², AdamW's or SGD's heuristics), not a dense "
                         "or K-FAC covariance")
    was = model.training
    model.eval()
    try:
        chunks = _rejoined(_inputs(model, layer, data), chunk_size)
        first = next(chunks, None)
        if first is None:
            raise ValueError("screening needs at least one example")
        return compute_sensitivities(layer, itertools.chain([first], chunks), var, loss, form=form,
                                     chunk_size=chunk_size, max_amplification=max_amplification)
    finally:
        model.train(was)


def _rejoined(parts: Iterable[tuple[Tensor, Tensor, Tensor]], size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The forward chunks' (features, targets, indices) in chunks of ``size`` rows, joined as they come: one chunk's
    features in memory at a time, not the whole set's."""
    held: list[tuple[Tensor, Tensor, Tensor]] = []
    rows = 0
    for part in parts:
        held.append(part)
        rows += len(part[1])
        while rows >= size:
            a, y, idx = (torch.cat(t) for t in zip(*held))
            yield a[:size], y[:size], idx[:size]
            held, rows = [(a[size:], y[size:], idx[size:])], rows - size
    if rows:
        yield tuple(torch.cat(t) for t in zip(*held))
