"""Pure tensor-list functions behind `IVON` (shared/DESIGN.md §2).

Each function takes lists of same-device tensors and works in place with ``torch._foreach_*``. Lists are processed
in chunks so that the one temporary list a function needs stays a fraction of the parameter memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

# Temporaries never exceed this fraction of the tensors being updated (the largest single tensor excepted).
_CHUNK_FRACTION = 0.125


def chunks(lists: Sequence[list[Tensor]], *extra: list) -> Iterator[tuple[list, ...]]:
    """Yield aligned slices of ``lists`` (and of plain per-tensor lists ``extra``) with bounded total numel."""
    first = lists[0]
    total = sum(t.numel() for t in first)
    budget = max(int(total * _CHUNK_FRACTION), 1)
    start, size = 0, 0
    for i, t in enumerate(first):
        size += t.numel()
        if size >= budget or i == len(first) - 1:
            yield tuple(lst[start : i + 1] for lst in (*lists, *extra))
            start, size = i + 1, 0


def inverse_std(hess: list[Tensor], ess: float, weight_decay: float) -> list[Tensor]:
    """sqrt(ess * (h + δ)), the inverse posterior standard deviation (a new list)."""
    out = torch._foreach_add(hess, weight_decay)
    torch._foreach_mul_(out, ess)
    torch._foreach_sqrt_(out)
    return out


def ivon_update(
    params: list[Tensor],
    grads: list[Tensor],
    stats: list[Tensor],
    momentum: list[Tensor],
    hess: list[Tensor],
    debias: list[float],
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
        torch._foreach_mul_(mom, beta1)
        torch._foreach_add_(mom, g, alpha=1.0 - beta1)

        hd = torch._foreach_add(h, weight_decay)  # the chunk's one temporary
        if price:  # ĥ = ess (h + δ) mean(ĝ σε)
            torch._foreach_mul_(s, hd)
        torch._foreach_mul_(s, ess)
        torch._foreach_sub_(s, h)  # s = ĥ − h
        torch._foreach_reciprocal_(hd)
        torch._foreach_mul_(hd, s)  # hd = (ĥ − h) / (h + δ)
        torch._foreach_add_(h, s, alpha=1.0 - beta2)
        torch._foreach_addcmul_(h, s, hd, value=0.5 * (1.0 - beta2) ** 2)

        torch._foreach_copy_(s, mom)
        torch._foreach_div_(s, d)
        torch._foreach_add_(s, p, alpha=weight_decay)
        torch._foreach_copy_(hd, h)
        torch._foreach_add_(hd, weight_decay)
        torch._foreach_div_(s, hd)
        if clip_radius != float("inf"):
            torch._foreach_clamp_min_(s, -clip_radius)
            torch._foreach_clamp_max_(s, clip_radius)
        torch._foreach_add_(p, s, alpha=-lr_eff)
