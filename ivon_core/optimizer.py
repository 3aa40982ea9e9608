"""IVON: Improved Variational Online Newton (Shen et al. 2024, Alg. 1), a drop-in for ``ivon-opt``'s ``IVON``.

Per trainable parameter the optimizer keeps the mean m (the parameter itself), a Hessian estimate h and a
momentum g, in float32 (float64 for float64 parameters). The posterior is N(m, 1/(ess (h + δ))).

Memory: besides the gradients, a step holds momentum, hess and one spare buffer per parameter (the sampled
weights during the forward pass, then the Hessian statistic), about 3 parameter copies plus a bounded chunk
of temporaries; ivon-opt allocates about ten. A second MC sample or micro-batch per step allocates two more.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ivon_core import _functional as F
from ivon_core._fused import MIN_NUMEL, FusedKernels, split
from ivon_core._hyper import RULES, check, real
from ivon_core._sampling import SamplingStage, state_dtype
from ivon_core._state import all_reduce_mean, bind_group, check_layout
from ivon_core._unguarded import UnguardedOptimizer
from ivon_core.compat import IvonOptCompat, from_ivon_opt, is_ivon_opt
from ivon_core.noise import NoiseSource, counter_keys

HESS_APPROX = ("price", "gradsq")
SHARE_SAMPLE = 2**20  # parameters read by hess_init_share
NOISE = ("auto", "torch", "blocks", "counter")
FORMAT = 2  # state_dict layout: 2 when "torch" noise became ivon-opt's numbers (before: "blocks")


def matched_beta2(total_steps: int, c: float = 1.0) -> float:
    """β2 = 1 − c / total_steps, so that h moves from hess_init within the run (docs/validation.md: with the default
    β2 = 0.99999 and a few thousand steps h stays at hess_init and the LOO estimate sits near the training loss).
    h still holds e^-c · hess_init at the end, often most of h where the learned curvature is small: then the LOO's
    scale is hess_init's (``IVON.hess_init_share`` says how much)."""
    if total_steps < 1:
        raise ValueError(f"Invalid total_steps: {total_steps!r} (must be >= 1)")
    return min(0.99999, max(0.0, 1.0 - c / total_steps))


class IVON(SamplingStage, IvonOptCompat, UnguardedOptimizer):
    """Variational learning with the IVON update; constructor and defaults as in ``ivon-opt`` 0.1.3.

    Usage (as with ivon-opt)::

        for x, y in loader:
            for _ in range(train_samples):
                with optimizer.sampled_params(train=True):
                    optimizer.zero_grad()
                    loss_fn(model(x), y).backward()
            optimizer.step()

    Gradient accumulation: every ``sampled_params(train=True)`` block is one MC sample; pass
    ``weight=`` (e.g. the micro-batch size) to weight samples unequally. ``p.grad`` must hold the
    gradient of the current sample only when the block exits (zero the gradients inside the block, or
    with ``set_to_none=True`` before it).

    ivon-opt compatibility: ``noise="torch"`` draws ivon-opt's numbers (one ``torch.randn`` per parameter group from
    torch's generator: the same seed gives the same weights, up to float rounding); ``param_groups`` carry ivon-opt's
    ``hess``, ``momentum`` (flat views of the per-parameter state, always in sync) and ``numel``; ``load_state_dict``
    takes ivon-opt's checkpoints and ``ivon_opt_state_dict()`` writes one ivon-opt loads (``ivon_core.compat``); a
    closure may open ``sampled_params`` itself, as ivon-opt's do. Differences: frozen parameters are neither sampled
    nor decayed and hold no state; ``current_step`` is saved; under torch.distributed each rank draws its own noise.

    Beyond ivon-opt's arguments, ``noise="blocks"`` draws torch's numbers faster and otherwise: on the CPU with
    ``noise_threads`` generators in parallel (default: torch's thread count, at most 8), on accelerators a chunk of
    tensors at a time. ``fused=True`` runs each stage on large CPU tensors as one compiled kernel (torch.compile;
    about 25 s of compilation at the first step, cached on disk after): a third less optimizer work on CPU
    (bench/optimizer.py); other devices keep the multi-tensor path. ``noise="counter"`` draws ε from a counter-based
    generator keyed by torch's generator (``ivon_core.noise.counter_normal``) instead of ``normal_``: as
    reproducible and resumable, not the same numbers; with ``fused=True`` ε is computed inside the kernels
    (bench/optimizer.py: the draw was over half of the fused step's time), and each ``step()`` writes the next
    sample in its update kernel (the keys of the next sample are drawn at ``step()`` and saved with the state; if
    the mean, h, ess or δ change before the next ``sampled_params``, the sample is drawn again, bitwise the same as
    it would have been). Without ``fused`` it is slower than torch's generator; use the two together.

    The defaults (``fused=None``, ``noise="auto"``) choose at the first sample: where every trainable tensor is on
    the CPU and one holds at least ``MIN_NUMEL`` (65,536) float32/float64 elements, the fused kernels with counter
    noise (the fastest CPU step: about half the multi-tensor path's work); elsewhere (small models, accelerators,
    or a compiler that fails) the multi-tensor path with ``noise="torch"``, the numbers ivon-opt draws. A
    ``state_dict`` keeps the noise chosen, and a default optimizer that loads it draws the same.
    """

    hessian_approx_methods = HESS_APPROX

    def __init__(
        self,
        params,
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        hess_approx: str = "price",
        clip_radius: float = float("inf"),
        sync: bool = False,
        debias: bool = True,
        rescale_lr: bool = True,
        noise_threads: int | None = None,
        fused: bool | None = None,
        noise: str = "auto",
    ):
        check("mc_samples", mc_samples, isinstance(mc_samples, numbers.Integral) and not isinstance(mc_samples, bool)
               and mc_samples >= 1, "an int >= 1")
        check("hess_approx", hess_approx, hess_approx in HESS_APPROX, f"one of {HESS_APPROX}")
        check("fused", fused, fused is None or isinstance(fused, bool), "a bool or None")
        check("noise", noise, noise in NOISE, f"one of {NOISE}")
        defaults = dict(
            lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
            clip_radius=clip_radius, mc_samples=int(mc_samples),
        )
        super().__init__(params, defaults)  # each group checked and laid out in add_param_group
        self.mc_samples = int(mc_samples)
        self.hess_approx = hess_approx
        self.sync = sync
        self.debias = debias
        self.rescale_lr = rescale_lr
        self._buf: dict[Tensor, dict[str, Any]] = {}  # per-step sampling buffers, never saved
        self._sampling = False
        self._closure = False  # inside step()'s call of a closure
        self._generators: dict[torch.device, torch.Generator] = {}
        self._scratch = F.Scratch()
        self._noise = NoiseSource(min(torch.get_num_threads(), 8) if noise_threads is None else noise_threads)
        self._fused = FusedKernels() if fused else None
        self._auto_fused = fused is None
        self.noise = noise  # "auto" until the first sample (``_choose``)
        # noise="counter": the keys of the next sample, drawn at step() so that the fused update kernels can write
        # that sample (saved with the state: a resumed run draws the same sample)
        self._next_keys: list[tuple[Tensor, Tensor]] | None = None

    def _choose(self) -> None:
        """Settle ``fused=None`` and ``noise="auto"`` at the first sample, when the tensors' devices and sizes are known
        (see the class docstring)."""
        if not self._auto_fused and self.noise != "auto":
            return
        tensors = [p for _, p in self._trainable()]
        large = [p for p in tensors if p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)
                 and p.numel() >= MIN_NUMEL]
        fast = bool(large) and all(p.device.type == "cpu" for p in tensors)
        if self._auto_fused:
            self._auto_fused = False
            self._fused = FusedKernels() if fast else None
        if self.noise == "auto":  # counter noise only where its kernels compile: unfused it is the slower draw
            counter = fast and self._fused is not None and self._fused.ready(
                large[0].dtype, self.hess_approx == "price", counter=True)
            self.noise = "counter" if counter else "torch"

    def _fusable(self, tensors: list[Tensor], partners: list[Tensor]) -> list[bool]:
        """Which tensors the compiled kernels take (large CPU float tensors whose partner has their dtype)."""
        k, price, counter = self._fused, self.hess_approx == "price", self.noise == "counter"
        return [k is not None and k.usable(t) and q.dtype == t.dtype and k.ready(t.dtype, price, counter)
                for t, q in zip(tensors, partners)]

    # ----------------------------------------------------------------------------------------- state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, with the group's hyperparameters checked and its state laid out (``bind_group``)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, (test, rule) in RULES.items():
            group[key] = real(key, group[key], finite=key != "clip_radius")
            check(key, group[key], test(group[key]), rule)
        bind_group(self.state, group, state_dtype)

    def _trainable(self) -> Iterator[tuple[dict, Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield group, p

    def _init_state(self, group: dict, p: Tensor) -> dict:
        st = self.state[p]
        if not st or st["momentum"].device != p.device or st["momentum"].dtype != state_dtype(p):
            bind_group(self.state, group, state_dtype)  # unfrozen, or moved by model.to(...)
        return st

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The default generator alone, or a per-rank one under torch.distributed so that ranks draw different noise."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed((torch.initial_seed() * 1_000_003 + 7919 * dist.get_rank()) % (2**63))
            self._generators[device] = gen
        return gen

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for group in sd["param_groups"]:  # views of the per-parameter state: saved once, there
            for key in ("hess", "momentum", "numel"):
                group.pop(key, None)
        sd["ivon"] = {"format": FORMAT,
            "hess_approx": self.hess_approx, "mc_samples": self.mc_samples, "debias": self.debias,
            "rescale_lr": self.rescale_lr,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
            "noise": self._noise.state(), "noise_kind": self.noise,
            "next_keys": None if self._next_keys is None else [[int(a), int(b)] for a, b in self._next_keys],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this optimizer or of ivon-opt's ``IVON`` (its Hessian, momentum and, from
        ``state_dict["current_step"]``, its step count: ``ivon_core.compat.from_ivon_opt``)."""
        if is_ivon_opt(state_dict):
            state_dict = from_ivon_opt(state_dict, self.param_groups, self.debias)
        state_dict = dict(state_dict)
        extra = state_dict.pop("ivon", {})
        check_layout(state_dict, self.param_groups)
        if extra.get("hess_approx", self.hess_approx) != self.hess_approx:
            raise ValueError(
                f"state_dict was saved with hess_approx={extra['hess_approx']!r}, this optimizer uses "
                f"{self.hess_approx!r}"
            )
        saved = extra.get("noise_kind", "auto")  # "auto": saved before the first sample, or by another package
        if saved == "torch" and extra.get("format", 1) < 2:
            saved = "blocks"  # what "torch" drew before it drew ivon-opt's numbers
        if saved != "auto" and self.noise == "auto":
            self.noise = saved  # resume with the saved run's noise
        elif saved not in ("auto", self.noise):
            raise ValueError(
                f"state_dict was saved with noise={saved!r}, this optimizer draws noise={self.noise!r}: the resumed "
                f"run would sample other numbers; construct it with noise={saved!r} or the default ('auto')"
            )
        super().load_state_dict(state_dict)
        for _, p in self._trainable():  # torch casts state to the param dtype; keep float32 for bf16/fp16
            if self.state.get(p):
                st = self.state[p]
                st["momentum"] = st["momentum"].to(p.device, state_dtype(p))
                st["hess"] = st["hess"].to(p.device, state_dtype(p))
                st["step"] = st["step"].to("cpu", torch.float32, copy=True)  # never the saved tensor itself
        for group in self.param_groups:  # torch replaced the group dicts by the saved ones
            group.setdefault("mc_samples", self.mc_samples)
            bind_group(self.state, group, state_dtype)
        self._buf.clear()
        self._generators.clear()
        if "noise" in extra:
            self._noise.load(extra["noise"])
        pending = extra.get("next_keys")
        self._next_keys = None if pending is None else [
            (torch.tensor(a, dtype=torch.int32), torch.tensor(b, dtype=torch.int32)) for a, b in pending]
        for dev, gstate in extra.get("generators", {}).items():
            gen = torch.Generator(device=torch.device(dev))
            gen.set_state(gstate)
            self._generators[torch.device(dev)] = gen

    # -------------------------------------------------------------------------------------- sampling
    def variances(self) -> list[Tensor]:
        """Posterior variance σ² = 1 / (ess (h + δ)) per parameter, in param-group order (zeros when frozen)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    out.append(torch.zeros(p.shape, dtype=state_dtype(p), device=p.device))
                    continue
                h = self._init_state(group, p)["hess"]
                out.append(torch.reciprocal((h + group["weight_decay"]) * group["ess"]))
        return out

    def hess_init_share(self) -> float:
        """Median over trainable parameters of β2^t · hess_init / h, capped at 1: how much of the curvature h is
        still its initial value after t steps (1 before any step). Near 1, σ² and every LOO estimate from it are
        set by hess_init and the run's length rather than by the data (docs/validation.md). Exact up to
        ``SHARE_SAMPLE`` parameters; beyond, the median of an evenly strided sample of about that many."""
        tensors = list(self._trainable())
        total = sum(p.numel() for _, p in tensors)
        if not total:
            return float("nan")
        stride = -(-total // SHARE_SAMPLE)  # memory bounded, not a copy of h
        shares = []
        for group, p in tensors:
            h = self._init_state(group, p)["hess"].detach().reshape(-1)[::stride].float()
            shares.append((self.hess_init_remainder(p) / h).nan_to_num(1.0, posinf=1.0).clamp(0.0, 1.0).cpu())
        return float(torch.cat(shares).median())

    def hess_init_remainder(self, p: Tensor) -> float:
        """β2^t · hess_init: what parameter ``p``'s curvature h still holds of its initial value after t steps."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        step = float(self.state[p]["step"]) if "step" in self.state[p] else 0.0
        return float(group["hess_init"]) * float(group["beta2"]) ** step

    @contextmanager
    def sampled_params(self, train: bool = False, weight: float = 1.0):
        """Replace every trainable parameter by a posterior sample θ = m + σε for the block's duration.

        With ``train=True`` the gradient found in ``p.grad`` on exit is collected as one MC sample, weighted by
        ``weight``. The mean is restored exactly on exit, also when the block raises.
        """
        if self._sampling and self._closure:  # an ivon-opt-style closure opens its own block: step's sample
            yield
            return
        if self._sampling:
            raise RuntimeError("sampled_params blocks cannot be nested")
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"Invalid weight: {weight!r} (must be a finite number > 0)")
        self._sampling = True
        swapped: list[Tensor] = []
        try:
            with torch.no_grad():
                self._sample(swapped)
            yield
        except BaseException:
            with torch.no_grad():
                self._restore(swapped, train=False, weight=weight)
            self._sampling = False
            raise
        with torch.no_grad():
            self._restore(swapped, train=train, weight=weight)
        self._sampling = False

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update from the samples collected since the last step; with a closure, draw ``mc_samples`` first.

        The closure must compute the loss and call ``backward()``; gradients are zeroed before each sample. A
        closure written for ivon-opt, which opens ``sampled_params(train=True)`` itself, works too.
        """
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with self.sampled_params(train=True):
                    self.zero_grad(set_to_none=True)
                    self._closure = True
                    try:
                        with torch.enable_grad():
                            losses.append(torch.as_tensor(closure()).detach())
                    finally:
                        self._closure = False
            loss = torch.stack(losses).mean()
        if self._sampling:
            raise RuntimeError("step() called inside sampled_params; call it after the block")
        # (group, p, state, buffer) once per parameter: tensor-keyed lookups are a visible share of host time
        collected = [(g, p, self.state[p], buf) for g, p in self._trainable()
                     if "stat" in (buf := self._buf.get(p, {}))]
        if not collected:
            raise RuntimeError(
                "step() found no sampled gradient: run forward and backward inside "
                "`with optimizer.sampled_params(train=True):` before calling step(), or pass a closure"
            )
        grads = []
        for _, p, _, buf in collected:
            if "grad_acc" in buf:
                grads.append(buf.pop("grad_acc"))
            else:
                ref, version = buf.pop("grad_ref")
                if ref._version != version:
                    raise RuntimeError("a parameter's gradient was changed in place after its sample was collected")
                grads.append(ref if ref.dtype == state_dtype(p) else ref.to(state_dtype(p)))
        nxt = None
        if self.noise == "counter":  # the next sample's keys, now: the fused update kernels write that sample
            trainable = [p for _, p in self._trainable()]
            self._next_keys = counter_keys(len(trainable), self._generator(torch.device("cpu")))
            nxt = dict(zip(trainable, self._next_keys))
        if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for (_, p, _, buf), g in zip(collected, grads):
                self._settle(p, buf, g)
            all_reduce_mean(grads + [buf["stat"] for *_, buf in collected])
        for group in self.param_groups:
            mine = [(c, g) for c, g in zip(collected, grads) if c[0] is group]
            if not mine:
                continue
            ps = [c[1] for c, _ in mine]
            sts = [c[2] for c, _ in mine]
            bufs = [c[3] for c, _ in mine]
            gs = [g for _, g in mine]
            steps = [st["step"].add_(1.0) for st in sts]
            # β1 = 1 keeps the momentum at its initial value: nothing to debias (1 − β1^t would be 0)
            debias = [1.0 - group["beta1"] ** float(s) if self.debias and group["beta1"] < 1.0 else 1.0 for s in steps]
            hess = [st["hess"] for st in sts]
            fused = self._fusable([p.data for p in ps], hess)
            for p, buf, g, f in zip(ps, bufs, gs, fused):
                if not f:  # θ is kept only for tensors that the update kernel takes too; settle any other
                    self._settle(p, buf, g)
            stats = [buf.pop("stat") for buf in bufs]
            theta = [buf.pop("theta", None) for buf in bufs]
            if any(v is not None and p._version != v for p, v in zip(ps, theta)):
                raise RuntimeError("a parameter's mean was changed in place between its sample and step()")
            lists = ([p.data for p in ps], gs, stats, [st["momentum"] for st in sts], hess, debias,
                     [v is not None for v in theta])
            fast, rest = split(fused, *lists)
            hyper = dict(lr=group["lr"], ess=group["ess"], beta1=group["beta1"], beta2=group["beta2"],
                         weight_decay=group["weight_decay"], hess_init=group["hess_init"],
                         clip_radius=group["clip_radius"], price=self.hess_approx == "price",
                         rescale_lr=self.rescale_lr)
            if fast[0]:
                fast_ps = [p for p, f in zip(ps, fused) if f]
                keys = None if nxt is None else [nxt[p] for p in fast_ps]
                self._fused.update_(*fast, **hyper, keys=keys)
                for i, p in enumerate(fast_ps if keys else []):  # the stat buffer now holds the next sample
                    self._buf[p]["prepared"] = self._token(p, fast[2][i], fast[4][i], keys[i], group)
            if rest[0]:
                F.ivon_update(*rest[:5], rest[5], self._scratch, **hyper)
            for buf, s in zip(bufs, stats):
                buf.pop("weight", None)
                buf["spare"] = s
        return loss
