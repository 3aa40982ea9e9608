"""Gaussian noise for posterior samples, drawn in parallel on the CPU.

torch's CPU generator (MT19937) draws serially: for an 11M-parameter model it takes longer than a whole AdamW
step. ``NoiseSource`` splits the draw over ``threads`` private generators (the GIL is released inside
``normal_``). Results depend only on the seed and the thread count, which are saved with the state. With one
thread the default generator (or the per-rank one) is used directly, drawing tensor by tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

KEY_LOW, KEY_HIGH = -(2**31), 2**31  # keys are int32 values
_M1, _M2 = 0x7FEB352D, 0x846CA68B - 2**32  # "lowbias32" multipliers (C. Wellons), as int32


def _hash32(x: Tensor) -> Tensor:
    # int32 only (a logical shift is an arithmetic shift and a mask): 64-bit lanes would halve the vector width
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def counter_normal(n: int, key1: Tensor, key2: Tensor, device: torch.device | str = "cpu", offset: int = 0) -> Tensor:
    """Draws ``offset`` to ``offset + n`` of the stream that the int32 keys define, as float32 N(0, 1) numbers
    (eager, or inside a compiled kernel).

    A keyed affine map of the index, two rounds of a 32-bit integer hash (the second keyed again), 23 bits of
    uniform u in (0, 1), z = sqrt(2) erfinv(2u − 1) to a relative error under 3.1e-6; |z| <= 5.3.
    """
    if offset + n >= 2**31:
        raise ValueError(f"counter_normal draws at most 2**31 - 1 numbers per key, asked for {offset + n}")
    return _normal_at(torch.arange(offset, offset + n, dtype=torch.int32, device=device), key1, key2)


def _uniform_at(idx: Tensor, key1: Tensor, key2: Tensor) -> Tensor:
    """t = 2u − 1 in (−1, 1), never ±1, for ``idx`` of the streams ``key1, key2``."""
    # an odd multiplier from key2 first: with idx ^ key1 alone, keys that differ in low bits permute one set
    x = _hash32(_hash32(idx * (key2 | 1) + key1) ^ key2)
    return (((x >> 9) & 0x7FFFFF).to(torch.float32) + 0.5) * (2.0 / (1 << 23)) - 1.0


def _log(x: Tensor) -> Tensor:
    """log of positive normal float32 numbers to 1e-7: exponent bits and a degree-7 polynomial in the mantissa
    (half the cost of the vectorized library log in the compiled draw)."""
    i = x.view(torch.int32) - 0x3F3504F3  # mantissa in [sqrt(1/2), sqrt(2)): the polynomial's interval
    f = ((i & 0x7FFFFF) + 0x3F3504F3).view(torch.float32) - 1.0
    p = -0.10134057
    for c in (0.16234189, -0.17247014, 0.19898565, -0.24970071, 0.33335114, -0.50000364, 0.99999994):
        p = p * f + c
    return (i >> 23).to(torch.float32) * 0.6931471805599453 + f * p


def _normal_at(idx: Tensor, key1: Tensor, key2: Tensor) -> Tensor:
    """Draw ``idx`` of the streams ``key1, key2`` (int32 tensors that broadcast together)."""
    t = _uniform_at(idx, key1, key2)
    # erfinv(t) = t g(w), w = −log(1 − t²) in [0, 15.25] for 23-bit uniforms: one degree-10 polynomial in w − 2.5
    # (a Chebyshev fit of g weighted for relative error) where M. Giles' approximation takes two branches and a
    # square root. Literals, not module globals: torch.compile would pass globals as tensors (a 2x slower kernel).
    a = -_log((1.0 - t) * (1.0 + t)) - 2.5
    p = -2.3482554e-11
    for c in (1.4575581e-09, -3.7197328e-08, 4.8221295e-07, -2.7820317e-06, -6.3820062e-06, 0.00021615320,
              -0.0012453595, -0.0041749892, 0.24663119, 1.5014082):
        p = p * a + c
    return p * t * math.sqrt(2.0)


def fill_counter_(t: Tensor, key1: Tensor, key2: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``t`` ← the keys' counter draws, in chunks so that temporaries stay small (the unfused path)."""
    flat = t.view(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        part.copy_(counter_normal(part.numel(), key1, key2, t.device, offset=start))
    return t


def draw_segments(idx: Tensor, seg: Tensor, key1: Tensor, key2: Tensor) -> Tensor:
    """Element j draws number ``idx[j]`` of the stream ``key1[seg[j]], key2[seg[j]]`` (many tensors in one draw)."""
    return _normal_at(idx, key1[seg], key2[seg])


@functools.lru_cache(maxsize=16)
def _segment_index(sizes: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # fixed for a model's tensors: built once, not at every sample
    sizes_t = torch.tensor(sizes, device=device)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes_t)
    idx = (torch.arange(sum(sizes), device=device) - starts[seg]).to(torch.int32)
    return idx, seg


def fill_counter_many_(tensors: list[Tensor], keys: list[tuple[Tensor, Tensor]], block: int = 1 << 20,
                       draw: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = draw_segments) -> None:
    """Fill same-device tensors, each with its keys' stream (as ``fill_counter_`` would, and as the fused kernel
    does): tensors under ``block`` elements in one draw per block instead of one per tensor (``draw``: a compiled
    ``draw_segments``, say)."""
    small: list[tuple[Tensor, tuple[Tensor, Tensor]]] = []
    for t, k in zip(tensors, keys):
        if t.numel() >= block:
            fill_counter_(t, *k)
        else:
            small.append((t, k))
    while small:
        take, size = 0, 0
        while take < len(small) and size + small[take][0].numel() <= block:
            size += small[take][0].numel()
            take += 1
        batch, small = small[:take], small[take:]
        dev = batch[0][0].device
        sizes = [t.numel() for t, _ in batch]
        idx, seg = _segment_index(tuple(sizes), dev)
        k1, k2 = (torch.stack([k[j] for _, k in batch]).to(dev) for j in (0, 1))
        flat = draw(idx, seg, k1, k2)
        torch._foreach_copy_([t for t, _ in batch], [v.view(t.shape) for v, (t, _) in zip(flat.split(sizes), batch)])


def counter_keys(count: int, generator: torch.Generator | None) -> list[tuple[Tensor, Tensor]]:
    """Two int32 keys per tensor, drawn from ``generator`` (torch's seed and state govern the counter noise)."""
    keys = torch.randint(KEY_LOW, KEY_HIGH, (count, 2), dtype=torch.int64, generator=generator).tolist()
    # separate tensors, not views of one: a compiled kernel would guard on the views' base
    return [(torch.tensor(a, dtype=torch.int32), torch.tensor(b, dtype=torch.int32)) for a, b in keys]


def _segments(tensors: list[Tensor], parts: int) -> list[list[Tensor]]:
    """Split the tensors' elements into ``parts`` contiguous runs of (nearly) equal size, as flat views."""
    total = sum(t.numel() for t in tensors)
    size = -(-total // parts)
    out: list[list[Tensor]] = [[] for _ in range(parts)]
    part, room = 0, size
    for t in tensors:
        flat, start = t.view(-1), 0
        while start < flat.numel():
            take = min(flat.numel() - start, room)
            out[part].append(flat[start : start + take])
            start, room = start + take, room - take
            if room == 0 and part < parts - 1:
                part, room = part + 1, size
    return out


class NoiseSource:
    """Fills tensors with N(0, 1) draws from ``threads`` generators (CPU) or one generator (other devices)."""

    def __init__(self, threads: int):
        if threads < 1:
            raise ValueError(f"Invalid noise_threads: {threads!r} (must be >= 1)")
        self.threads = threads
        self._gens: list[torch.Generator] = []
        self._pool: ThreadPoolExecutor | None = None

    def fill_(self, tensors: list[Tensor], base: torch.Generator | None) -> None:
        if not tensors:
            return
        if self.threads == 1 or tensors[0].device.type != "cpu":
            for t in tensors:
                t.normal_(generator=base)
            return
        if not self._gens:  # seeded from the base generator: torch.manual_seed makes runs reproducible
            seeds = torch.randint(0, 2**62, (self.threads,), generator=base).tolist()
            self._gens = [torch.Generator().manual_seed(s) for s in seeds]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="ivon-noise")
        parts = _segments(tensors, self.threads)

        def draw(i: int) -> None:
            for seg in parts[i]:
                seg.normal_(generator=self._gens[i])

        futures = [self._pool.submit(draw, i) for i in range(1, self.threads)]
        draw(0)
        for f in futures:
            f.result()

    def state(self) -> dict[str, Any]:
        return {"threads": self.threads, "generators": [g.get_state() for g in self._gens]}

    def load(self, state: dict[str, Any]) -> None:
        self.threads = int(state["threads"])
        self._gens = []
        for s in state["generators"]:
            g = torch.Generator()
            g.set_state(s)
            self._gens.append(g)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle without the pool
        return {"threads": self.threads, "_gens": self._gens, "_pool": None}


RANDN_BLOCK = 1 << 20  # a multiple of 16: the CPU kernel draws every uniform in order, then transforms 16 at a time


def randn_segments_(targets: list[Tensor | None], dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator | None, sizes: list[int]) -> None:
    """Fill ``targets`` with ``torch.randn(sum(sizes))`` split by ``sizes`` (a ``None`` target's share is drawn and
    dropped): ivon-opt's numbers, which draws one such vector per parameter group. On the CPU in blocks of
    ``RANDN_BLOCK`` (the same numbers as one draw, without a group-sized temporary); elsewhere in one draw."""
    total = sum(sizes)
    if not total:
        return
    if device.type != "cpu":
        _scatter(torch.randn(total, dtype=dtype, device=device, generator=generator), 0, targets, sizes)
        return
    buf = torch.empty(min(total, RANDN_BLOCK + 16), dtype=dtype)
    pos = 0
    while pos < total:
        end = total if total - pos < RANDN_BLOCK + 16 else pos + RANDN_BLOCK  # a last block under 16 would differ
        part = buf[: end - pos]
        part.normal_(generator=generator)
        _scatter(part, pos, targets, sizes)
        pos = end


def _scatter(part: Tensor, start: int, targets: list[Tensor | None], sizes: list[int]) -> None:
    """Copy ``part`` (elements ``start`` onwards of the concatenated targets) into the targets it overlaps."""
    dst, src, offset, end = [], [], 0, start + part.numel()
    for t, n in zip(targets, sizes):
        lo, hi = max(offset, start), min(offset + n, end)
        if t is not None and lo < hi:
            dst.append(t.view(-1)[lo - offset : hi - offset])
            src.append(part[lo - start : hi - start])
        offset += n
        if offset >= end:
            break
    if dst:
        torch._foreach_copy_(dst, src)
