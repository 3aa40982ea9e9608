"""Pure tensor-list functions behind `IVON` (shared/DESIGN.md §2).

Each function takes lists of same-device tensors and works in place with ``torch._foreach_*``. Lists are processed
in chunks so that the one temporary list a function needs stays a fraction of the parameter memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

# Temporaries never exceed this fraction of the tensors being updated (the largest single tensor excepted). On an
# accelerator each chunk costs ~20 multi-tensor launches, whose host time dominates below tens of millions of
# parameters, so a chunk there is also allowed _CHUNK_MIN_ACCELERATOR elements: ResNet-18 (11.2M) on an H200 took
# 2.14 ms per iteration in one chunk, 3.00 ms in chunks of 0.2 (AdamW: 1.08 ms), for 0.66 parameter copies more.
_CHUNK_FRACTION = {"cpu": 0.125}
_CHUNK_FRACTION_ACCELERATOR = 0.2
_CHUNK_MIN_ACCELERATOR = 1 << 25
# On a CPU a chunk may hold 1M elements whatever the fraction: below ~8M parameters the temporaries are a few MB and
# each extra chunk (or split tensor) costs host time on every step (digits MLPs: 6% of the validation's tracking)
_CHUNK_MIN = {"cpu": 1 << 20}


def chunks(lists: Sequence[list[Tensor]], *extra: list) -> Iterator[tuple[list, ...]]:
    """Yield aligned slices of ``lists`` (and of plain per-tensor lists ``extra``) with bounded total numel."""
    first = lists[0]
    total = sum(t.numel() for t in first)
    if not first:
        return
    device = first[0].device.type
    budget = max(int(total * _CHUNK_FRACTION.get(device, _CHUNK_FRACTION_ACCELERATOR)), 1)
    budget = max(budget, _CHUNK_MIN.get(device, _CHUNK_MIN_ACCELERATOR))
    if any(t.numel() > budget for t in first):
        lists, extra = _split_large(lists, extra, budget)
        first = lists[0]
    start, size = 0, 0
    for i, t in enumerate(first):
        if size and size + t.numel() > budget:  # over the budget only where one unsplittable tensor is
            yield tuple(lst[start:i] for lst in (*lists, *extra))
            start, size = i, 0
        size += t.numel()
    yield tuple(lst[start:] for lst in (*lists, *extra))


def _split_large(lists: Sequence[list[Tensor]], extra: Sequence[list], budget: int) -> tuple[list, list]:
    """Tensors larger than ``budget`` replaced by flat views of at most ``budget`` elements (the updates are
    elementwise), where every list's tensor is contiguous; ``extra`` entries repeated for each piece."""
    out, more = [[] for _ in lists], [[] for _ in extra]
    for i, t in enumerate(lists[0]):
        n = t.numel()
        whole = n <= budget or not all(lst[i].is_contiguous() for lst in lists)
        bounds = [(0, n)] if whole else [(a, min(a + budget, n)) for a in range(0, n, budget)]
        for a, b in bounds:
            for lst, o in zip(lists, out):
                o.append(lst[i] if whole else lst[i].view(-1)[a:b])
            for e, o in zip(extra, more):
                o.append(e[i])
    return out, more


class Scratch:
    """Reusable temporaries: views into one flat buffer per (device, dtype), grown on demand.

    Fresh allocations of parameter-sized temporaries cost page faults on every step (on a CPU they take longer
    than the arithmetic); a reused buffer does not.
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # views per (device, dtype, shapes): slicing and viewing every tensor on every call costs more host time
        # than the kernels on small models and on accelerators
        self._views: dict[tuple, tuple[Tensor, list[Tensor]]] = {}

    def like(self, tensors: list[Tensor]) -> list[Tensor]:
        return self.flat_like(tensors)[1]

    def flat_like(self, tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One flat region and its views shaped like ``tensors``."""
        key = (tensors[0].device, tensors[0].dtype)
        shapes = tuple(t.shape for t in tensors)
        cached = self._views.get((key, shapes))  # entries of a key are dropped when its buffer grows
        if cached is not None:
            return cached
        need = sum(t.numel() for t in tensors)
        flat = self._flat.get(key)
        if flat is None or flat.numel() < need:
            flat = self._flat[key] = torch.empty(need, device=key[0], dtype=key[1])
            self._views = {k: v for k, v in self._views.items() if k[0] != key}  # they hold the old buffer
        out, pos = [], 0
        for t in tensors:
            out.append(flat[pos : pos + t.numel()].view(t.shape))
            pos += t.numel()
        if len(self._views) >= 64:  # a bound for layouts that keep changing (parameters frozen and unfrozen)
            self._views.clear()
        self._views[(key, shapes)] = flat[:need], out
        return flat[:need], out

    def clear(self) -> None:
        self._flat.clear()
        self._views.clear()


def scale_noise(noise: list[Tensor], hess: list[Tensor], scratch: Scratch, *, ess: float, weight_decay: float,
                draw: bool = False, generator: torch.Generator | None = None) -> None:
    """noise ← ε / sqrt(ess (h + δ)), in place, chunk by chunk.

    With ``draw``, ε ~ N(0, 1) is drawn here, one flat block per chunk from ``generator``: one kernel launch per
    chunk instead of one per tensor (for accelerators); otherwise ``noise`` already holds ε.
    """
    for eps, h in chunks([noise, hess]):
        flat, tmp = scratch.flat_like(h)
        if draw:
            flat.normal_(generator=generator)
            torch._foreach_copy_(eps, h)
            torch._foreach_add_(eps, weight_decay)
            torch._foreach_rsqrt_(eps)
            torch._foreach_mul_(eps, tmp)
        else:
            torch._foreach_copy_(tmp, h)
            torch._foreach_add_(tmp, weight_decay)
            torch._foreach_rsqrt_(tmp)
            torch._foreach_mul_(eps, tmp)
        torch._foreach_mul_(eps, ess**-0.5)


def ivon_update(
    params: list[Tensor],
    grads: list[Tensor],
    stats: list[Tensor],
    momentum: list[Tensor],
    hess: list[Tensor],
    debias: list[float],
    scratch: Scratch,
    *,
    lr: float,
    ess: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    hess_init: float,
    clip_radius: float,
    price: bool,
    rescale_lr: bool,
) -> None:
    """One IVON update. ``stats`` holds mean(ĝ ⊙ σε) ("price") or mean(ĝ²) ("gradsq") and is used as scratch.

    g ← β1 g + (1−β1) ḡ;  h ← β2 h + (1−β2) ĥ + ½(1−β2)² (h − ĥ)² / (h + δ);
    m ← m − α' clip((g/d + δ m) / (h + δ), ±r), with the new h.
    """
    lr_eff = lr * (hess_init + weight_decay) if rescale_lr else lr
    for p, g, s, mom, h, d in chunks([params, grads, stats, momentum, hess], debias):
        torch._foreach_lerp_(mom, g, 1.0 - beta1)
        tmp = scratch.like(h)
        torch._foreach_copy_(tmp, h)
        torch._foreach_add_(tmp, weight_decay)  # h + δ
        if price:  # ĥ = ess (h + δ) mean(ĝ σε)
            torch._foreach_mul_(s, tmp)
        torch._foreach_mul_(s, ess)
        torch._foreach_sub_(s, h)  # s = ĥ − h
        torch._foreach_reciprocal_(tmp)
        torch._foreach_mul_(tmp, s)  # (ĥ − h) / (h + δ)
        torch._foreach_add_(h, s, alpha=1.0 - beta2)
        torch._foreach_addcmul_(h, s, tmp, value=0.5 * (1.0 - beta2) ** 2)

        torch._foreach_copy_(s, mom)
        if len(set(d)) == 1:
            torch._foreach_mul_(s, 1.0 / d[0])
        else:
            torch._foreach_div_(s, d)
        torch._foreach_add_(s, p, alpha=weight_decay)
        torch._foreach_copy_(tmp, h)
        torch._foreach_add_(tmp, weight_decay)
        torch._foreach_div_(s, tmp)
        if clip_radius != float("inf"):
            torch._foreach_clamp_min_(s, -clip_radius)
            torch._foreach_clamp_max_(s, clip_radius)
        torch._foreach_add_(p, s, alpha=-lr_eff)
