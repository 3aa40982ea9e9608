"""Gaussian noise for posterior samples, drawn in parallel on the CPU.

torch's CPU generator (MT19937) draws serially: for an 11M-parameter model it takes longer than a whole AdamW
step. ``NoiseSource`` splits the draw over ``threads`` private generators (the GIL is released inside
``normal_``). Results depend only on the seed and the thread count, which are saved with the state. With one
thread the default generator (or the per-rank one) is used directly, drawing tensor by tensor.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor


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
