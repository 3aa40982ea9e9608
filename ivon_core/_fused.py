"""Compiled kernels for IVON's elementwise work on large CPU tensors (``IVON(fused=True)``).

The multi-tensor path (``_functional``) makes one pass over memory per operation: about 25 passes per step where
AdamW makes 20. Each kernel here does a whole stage in one pass (torch.compile / inductor, one graph with dynamic
sizes per stage and dtype, compiled on a small dummy tensor at first use, then cached on disk by inductor).
Small tensors stay on the multi-tensor path, where one launch serves many tensors. Where compilation fails (no
C++ compiler, say) the optimizer warns once and keeps the multi-tensor path.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ivon_core.noise import counter_normal, draw_segments

_log = logging.getLogger("ivon_core")
MIN_NUMEL = 1 << 16  # below this a kernel call's fixed cost (~0.1 ms) exceeds the passes it saves


def _sample(noise: Tensor, param: Tensor, hess: Tensor, ess: Tensor, wd: Tensor) -> None:
    # noise holds ε; it becomes the sample θ = m + ε / sqrt(ess (h + δ))
    noise.mul_(torch.rsqrt((hess + wd) * ess)).add_(param)


def _sample_counter(out: Tensor, param: Tensor, hess: Tensor, ess: Tensor, wd: Tensor, k1: Tensor,
                    k2: Tensor) -> None:
    # θ = m + ε / sqrt(ess (h + δ)) with ε drawn in the kernel (noise="counter"): ε is never stored
    eps = counter_normal(out.numel(), k1, k2, out.device).to(out.dtype)
    out.copy_(param + eps * torch.rsqrt((hess + wd) * ess))


def _stat(sample: Tensor, mean: Tensor, grad: Tensor) -> None:
    # σε ⊙ ĝ (the "price" statistic) in the sample's buffer
    sample.sub_(mean).mul_(grad)


def _step(p: Tensor, g: Tensor, s: Tensor, mom: Tensor, h: Tensor, debias: Tensor, lr: Tensor, ess: Tensor,
          beta1: Tensor, beta2: Tensor, wd: Tensor, radius: Tensor, price: bool) -> tuple[Tensor, Tensor]:
    # the same update as _functional.ivon_update, in one pass; returns the new mean and h
    mom.lerp_(g, 1.0 - beta1)
    a = h + wd
    d = (s * a if price else s) * ess - h  # ĥ − h
    new_h = h + (1.0 - beta2) * d + 0.5 * (1.0 - beta2) ** 2 * d * d / a
    h.copy_(new_h)
    new_p = p - lr * ((mom / debias + wd * p) / (new_h + wd)).clamp(-radius, radius)
    p.copy_(new_p)
    return new_p, new_h


def _update(p: Tensor, g: Tensor, s: Tensor, mom: Tensor, h: Tensor, debias: Tensor, lr: Tensor, ess: Tensor,
            beta1: Tensor, beta2: Tensor, wd: Tensor, radius: Tensor, price: bool) -> None:
    _step(p, g, s, mom, h, debias, lr, ess, beta1, beta2, wd, radius, price)


def _update_theta(p: Tensor, g: Tensor, theta: Tensor, mom: Tensor, h: Tensor, debias: Tensor, lr: Tensor,
                  ess: Tensor, beta1: Tensor, beta2: Tensor, wd: Tensor, radius: Tensor) -> None:
    # the "price" statistic (θ − m) ⊙ ĝ formed here from the kept sample θ: one pass less than _stat + _update
    _step(p, g, (theta - p) * g, mom, h, debias, lr, ess, beta1, beta2, wd, radius, True)


def _update_next(p: Tensor, g: Tensor, s: Tensor, mom: Tensor, h: Tensor, debias: Tensor, lr: Tensor, ess: Tensor,
                 beta1: Tensor, beta2: Tensor, wd: Tensor, radius: Tensor, price: bool, theta: bool, k1: Tensor,
                 k2: Tensor) -> None:
    # _update or _update_theta, then the next sample θ = m + ε σ into s (noise="counter"): the sampling kernel's
    # read of m and h is saved, and its expression is the same, so the sample is bitwise the one it would draw
    stat = (s - p) * g if theta else s
    new_p, new_h = _step(p, g, stat, mom, h, debias, lr, ess, beta1, beta2, wd, radius, price)
    eps = counter_normal(s.numel(), k1, k2, s.device).to(s.dtype)
    s.copy_(new_p + eps * torch.rsqrt((new_h + wd) * ess))


def _flat(t: Tensor) -> Tensor:
    # a flat alias that is not a view: views make dynamo guard on their base's shape (a recompile per rank)
    return t.view(-1).detach()


def _scalars(cache: dict[torch.dtype, list[Tensor]], dtype: torch.dtype, *values: float) -> list[Tensor]:
    # one 0-dim tensor per value and dtype per call, not per tensor
    if dtype not in cache:
        cache[dtype] = [torch.tensor(v, dtype=dtype) for v in values]
    return cache[dtype]


class FusedKernels:
    """The compiled stages; ``usable(t)`` says which tensors they take."""

    def __init__(self) -> None:
        self._compiled: dict[str, object] = {}
        self._ready: set[tuple[torch.dtype, bool, bool]] = set()
        self._draw = None
        self.broken = False

    def usable(self, t: Tensor) -> bool:
        return (not self.broken and t.device.type == "cpu" and t.numel() >= MIN_NUMEL
                and t.dtype in (torch.float32, torch.float64))

    def ready(self, dtype: torch.dtype, price: bool, counter: bool = False) -> bool:
        """Compile (once per dtype, statistic and noise) on a dummy tensor; on failure warn and stay unfused."""
        if self.broken:
            return False
        if (dtype, price, counter) in self._ready:
            return True
        # a first step that seems to hang should say why (measured: 27.7 s with an empty cache, 3.4 s with it)
        _log.info("IVON: compiling the fused kernels for %s (about 30 s on a machine's first run, cached on disk "
                  "after)", dtype)
        try:
            if not self._compiled:
                self._compiled = {f.__name__: torch.compile(f, dynamic=True)
                                  for f in (_sample, _sample_counter, _stat, _update, _update_theta, _update_next)}
            # at a realistic size: inductor sizes its threading to the example (64 elements: one thread)
            x = [torch.ones(MIN_NUMEL * 4, dtype=dtype) for _ in range(5)]
            # distinct scalars: one tensor passed twice would compile an aliasing guard
            c = [torch.tensor(v, dtype=dtype) for v in (1.0, 0.1, 64.0, 0.9, 0.99, 1e-3, 1.0)]
            self._compiled["_stat"](x[0], x[1], x[2])
            if counter:  # the update kernels draw the next sample (the sampling kernel serves the first one)
                keys = [torch.tensor(v, dtype=torch.int32) for v in (1, 2)]
                self._compiled["_sample_counter"](x[0], x[1], x[2], c[2], c[5], *keys)
                for theta in (True, False) if price else (False,):
                    self._compiled["_update_next"](*x, *c, price, theta, *keys)
            else:
                self._compiled["_sample"](x[0], x[1], x[2], c[2], c[5])
                self._compiled["_update"](*x, *c, price)
                if price:
                    self._compiled["_update_theta"](*x, *c)
        except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the multi-tensor path
            self.broken = True
            warnings.warn(f"IVON: compiling the fused kernels failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); using the multi-tensor path", RuntimeWarning, stacklevel=3)
            return False
        self._ready.add((dtype, price, counter))
        return True

    def draw_segments(self, idx: Tensor, seg: Tensor, key1: Tensor, key2: Tensor) -> Tensor:
        """The counter draws of small tensors, many at once (``noise.fill_counter_many_``'s ``draw``), compiled at the
        first call (at its real size); where that fails, warn once and draw eagerly."""
        if self._draw is None:
            self._draw = torch.compile(draw_segments, dynamic=True)
        if self._draw is not draw_segments:
            try:
                return self._draw(idx, seg, key1, key2)
            except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the eager draw
                self._draw = draw_segments
                warnings.warn(f"IVON: compiling the noise draw failed ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); drawing eagerly", RuntimeWarning, stacklevel=3)
        return draw_segments(idx, seg, key1, key2)

    def sample_(self, noise: Sequence[Tensor], params: Sequence[Tensor], hess: Sequence[Tensor], *, ess: float,
                weight_decay: float) -> None:
        scalars: dict[torch.dtype, list[Tensor]] = {}
        for n, p, h in zip(noise, params, hess):
            ess_t, wd_t = _scalars(scalars, n.dtype, ess, weight_decay)
            self._compiled["_sample"](_flat(n), _flat(p), _flat(h), ess_t, wd_t)

    def sample_counter_(self, out: Sequence[Tensor], params: Sequence[Tensor], hess: Sequence[Tensor],
                        keys: Sequence[tuple[Tensor, Tensor]], *, ess: float, weight_decay: float) -> None:
        scalars: dict[torch.dtype, list[Tensor]] = {}
        for n, p, h, (k1, k2) in zip(out, params, hess, keys):
            ess_t, wd_t = _scalars(scalars, n.dtype, ess, weight_decay)
            self._compiled["_sample_counter"](_flat(n), _flat(p), _flat(h), ess_t, wd_t, k1, k2)

    def stat_(self, samples: Sequence[Tensor], means: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        for s, m, g in zip(samples, means, grads):
            self._compiled["_stat"](_flat(s), _flat(m), _flat(g))

    def update_(self, params: list[Tensor], grads: list[Tensor], stats: list[Tensor], momentum: list[Tensor],
                hess: list[Tensor], debias: list[float], theta: list[bool], *, lr: float, ess: float, beta1: float,
                beta2: float, weight_decay: float, hess_init: float, clip_radius: float, price: bool,
                rescale_lr: bool, keys: Sequence[tuple[Tensor, Tensor]] | None = None) -> None:
        """``theta[i]``: ``stats[i]`` holds the sample θ, not yet the statistic (see ``IVON._restore``). With
        ``keys`` (noise="counter") each ``stats[i]`` is left holding the next sample, drawn with ``keys[i]``."""
        if not params:
            return
        lr_eff = lr * (hess_init + weight_decay) if rescale_lr else lr
        dtype = hess[0].dtype
        scalars = [torch.tensor(v, dtype=dtype) for v in (lr_eff, ess, beta1, beta2, weight_decay, clip_radius)]
        debias_t = {d: torch.tensor(d, dtype=dtype) for d in set(debias)}
        for i, (p, g, s, m, h, d, th) in enumerate(zip(params, grads, stats, momentum, hess, debias, theta)):
            args = (_flat(p), _flat(g), _flat(s), _flat(m), _flat(h), debias_t[d], *scalars)
            if keys is not None:
                self._compiled["_update_next"](*args, price, th, *keys[i])
            elif th:
                self._compiled["_update_theta"](*args)
            else:
                self._compiled["_update"](*args, price)


def split(mask: Sequence[bool], *lists: Sequence) -> tuple[tuple[list, ...], tuple[list, ...]]:
    """Aligned ``lists`` split into the items where ``mask`` holds and the rest."""
    yes = tuple([x for x, m in zip(lst, mask) if m] for lst in lists)
    no = tuple([x for x, m in zip(lst, mask) if not m] for lst in lists)
    return yes, no
