"""IVON's sampling stage: each parameter's mean swapped for a posterior sample θ = m + σε and back, and each
sample's gradient and Hessian statistic collected for ``step()`` (mixed into ``ivon_core.IVON``, whose state,
buffers and kernels it uses)."""

from __future__ import annotations

import torch
from torch import Tensor

from ivon_core import _functional as F
from ivon_core._fused import MIN_NUMEL, split
from ivon_core.noise import counter_keys, draw_segments, fill_counter_many_, randn_segments_

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(p: Tensor) -> torch.dtype:
    """IVON's state is float32 for bf16/fp16 parameters, else the parameter's dtype."""
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


class SamplingStage:
    def _sample(self, swapped: list[Tensor]) -> None:
        self._choose()
        counter, blocks = self.noise == "counter", self.noise == "blocks"
        by_group: list[tuple[dict, list[Tensor], list[Tensor], list[bool], list[dict], list[Tensor]]] = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.requires_grad]
            if not ps:
                continue
            hess, bufs = [], []  # looked up once: tensor-keyed lookups are a visible share of host time
            for p in ps:
                hess.append(self._init_state(group, p)["hess"])
                buf = self._buf.setdefault(p, {})
                self._claim_grad(p, buf)
                bufs.append(buf)
            noise = [self._take_spare(buf, p, state_dtype(p)) for buf, p in zip(bufs, ps)]
            if self.noise == "torch":
                self._draw_like_ivon_opt(group, dict(zip(ps, noise)))
            by_group.append((group, ps, noise, self._fusable(noise, ps), bufs, hess))
        # noise="counter": one key pair per tensor (whether fused or not, so that fused and unfused runs agree), those
        # that the last step drew if they are for these tensors
        keys, reused = self._counter_keys(sum(len(g[1]) for g in by_group)) if counter else ([], False)
        keys = iter(keys)
        group_keys = [[next(keys) if counter else None for _ in g[1]] for g in by_group]
        by_device: dict[torch.device, tuple[list[Tensor], list]] = {}
        for (_, _, noise, fused, _, _), ks in zip(by_group, group_keys):
            for n, f, k in zip(noise, fused, ks):
                if (counter and not f) or (blocks and n.device.type == "cpu"):
                    # fused kernels draw their own counter noise; accelerators draw in scale_noise, a block a chunk
                    tensors, tensor_keys = by_device.setdefault(n.device, ([], []))
                    tensors.append(n)
                    tensor_keys.append(k)
        for device, (noise, ks) in by_device.items():
            if counter:
                draw = draw_segments  # compiled with the fused kernels, where the draw is large enough to gain
                if self._fused is not None and device.type == "cpu" and sum(n.numel() for n in noise) >= MIN_NUMEL:
                    draw = self._fused.draw_segments
                fill_counter_many_(noise, ks, draw=draw)
            else:
                self._noise.fill_(noise, self._generator(device))
        for (group, ps, noise, fused, bufs, hess), ks in zip(by_group, group_keys):
            dev = noise[0].device
            (fast_p, fast_n, fast_h, fast_k), (ps_, noise_, hess_, _) = split(fused, ps, noise, hess, ks)
            hyper = dict(ess=group["ess"], weight_decay=group["weight_decay"])
            if fast_p and counter:  # sample into the spare buffer itself: θ = m + σε, unless the last step did
                todo = [self._buf[p].pop("prepared", None) != self._token(p, n, h, k, group) or not reused
                        for p, n, h, k in zip(fast_p, fast_n, fast_h, fast_k)]
                (fast_p, fast_n, fast_h, fast_k), _ = split(todo, fast_p, fast_n, fast_h, fast_k)
                self._fused.sample_counter_(fast_n, [p.data for p in fast_p], fast_h, fast_k, **hyper)
            elif fast_p:
                self._fused.sample_(fast_n, [p.data for p in fast_p], fast_h, **hyper)
            if ps_:
                F.scale_noise(noise_, hess_, self._scratch, **hyper, draw=dev.type != "cpu" and blocks,
                              generator=self._generator(dev))
                lean = [(p, n) for p, n in zip(ps_, noise_) if n.dtype == p.dtype]
                if lean:
                    torch._foreach_add_([n for _, n in lean], [p.data for p, _ in lean])
            for p, n, buf in zip(ps, noise, bufs):
                buf["mean"] = p.data
                if n.dtype == p.dtype:
                    p.data = n
                else:  # low precision: keep the exact float32 noise for the statistic
                    buf["noise"] = n
                    p.data = (p.data.to(n.dtype) + n).to(p.dtype)
                swapped.append(p)

    def _draw_like_ivon_opt(self, group: dict, noise: dict[Tensor, Tensor]) -> None:
        """ε as ivon-opt draws it: one ``torch.randn`` over the whole group, frozen parameters' share included."""
        layouts = {(n.device, n.dtype) for n in noise.values()}
        if len(layouts) > 1:  # a group ivon-opt would refuse: tensor by tensor
            for n in noise.values():
                n.normal_(generator=self._generator(n.device))
            return
        device, dtype = next(iter(layouts))
        targets = [noise.get(p) for p in group["params"]]
        randn_segments_(targets, dtype, device, self._generator(device), [p.numel() for p in group["params"]])

    def _counter_keys(self, count: int) -> tuple[list[tuple[Tensor, Tensor]], bool]:
        """Key pairs for ``count`` tensors, and whether they are those the last step drew (and wrote samples with)."""
        pending, self._next_keys = self._next_keys, None
        if pending is None or len(pending) != count:
            return counter_keys(count, self._generator(torch.device("cpu"))), False
        return pending, True

    @staticmethod
    def _token(p: Tensor, spare: Tensor, hess: Tensor, keys: tuple[Tensor, Tensor], group: dict) -> tuple:
        """What a sample written ahead by the update kernel depends on; any change and it is drawn again. The keys
        by identity: the pending key tensors live from the step to the sample (a tensor frozen or unfrozen in
        between shifts which tensor gets which pair)."""
        return (spare.data_ptr(), p.data_ptr(), p._version, hess.data_ptr(), hess._version, id(keys[0]),
                group["ess"], group["weight_decay"])

    @staticmethod
    def _take_spare(buf: dict, p: Tensor, dtype: torch.dtype) -> Tensor:
        spare = buf.pop("spare", None)
        if spare is None or spare.shape != p.shape or spare.dtype != dtype or spare.device != p.device:
            spare = torch.empty(p.shape, dtype=dtype, device=p.device)
        return spare

    def _claim_grad(self, p: Tensor, buf: dict | None = None) -> None:
        """Before a further sample, own the previous sample's gradient (it was only referenced)."""
        buf = self._buf.get(p) if buf is None else buf
        if not buf or "grad_ref" not in buf:
            return
        ref, version = buf.pop("grad_ref")
        if ref._version != version:
            raise RuntimeError(
                "a parameter's gradient was changed in place between two samples before it was collected; "
                "zero gradients inside `sampled_params` or with `zero_grad(set_to_none=True)`"
            )
        buf["grad_acc"] = ref.to(state_dtype(p), copy=p.grad is ref)

    def _restore(self, swapped: list[Tensor], train: bool, weight: float) -> None:
        price = self.hess_approx == "price"
        work, lean, means = [], [], []  # lean: the work items whose buffer holds θ (σε = θ − m still to take)
        for p in swapped:
            buf = self._buf[p]
            sample, mean = p.data, buf.pop("mean")
            p.data = mean
            noise = buf.pop("noise", None)
            grad = p.grad if train else None
            if grad is None:
                buf["spare"] = sample if noise is None else noise
                continue
            if grad.is_sparse:
                raise RuntimeError("IVON does not support sparse gradients")
            if noise is None:
                lean.append(len(work))
                means.append(mean)
            work.append((p, buf, sample if noise is None else noise, grad))
        if price and work:  # σε ⊙ ĝ, as multi-tensor kernels (or one fused kernel per large tensor)
            stats, grads = [w[2] for w in work], [w[3] for w in work]
            fast = self._fusable([stats[i] for i in lean], [grads[i] for i in lean])
            (fast_i, fast_m), (slow_i, slow_m) = split(fast, lean, means)
            if fast_i:  # a step's only sample: keep θ, the update kernel forms the statistic (one pass less)
                keep = [self.mc_samples == 1 and "stat" not in work[i][1] for i in fast_i]
                for i, k in zip(fast_i, keep):
                    if k:
                        work[i][1]["theta"] = work[i][0]._version
                (now_i, now_m), _ = split([not k for k in keep], fast_i, fast_m)
                if now_i:
                    self._fused.stat_([stats[i] for i in now_i], now_m, [grads[i] for i in now_i])
            if slow_i:
                torch._foreach_sub_([stats[i] for i in slow_i], slow_m)
            rest = sorted(set(range(len(work))) - set(fast_i))
            if rest:
                torch._foreach_mul_([stats[i] for i in rest], [grads[i] for i in rest])
        for p, buf, stat, grad in work:
            if not price:
                torch.mul(grad, grad, out=stat)
            total = buf.get("weight", 0.0) + weight
            buf["weight"] = total
            if "stat" not in buf:
                buf["stat"] = stat
                if self.mc_samples > 1:
                    buf["grad_acc"] = grad.to(state_dtype(p), copy=True)
                else:
                    buf["grad_ref"] = (grad, grad._version)
                continue
            if "grad_acc" not in buf:
                self._claim_grad(p)
            self._settle(p, buf, buf["grad_acc"])
            buf["stat"].lerp_(stat, weight / total)
            buf["spare"] = stat
            buf["grad_acc"].lerp_(grad.to(buf["grad_acc"].dtype), weight / total)

    def _settle(self, p: Tensor, buf: dict, grad: Tensor) -> None:
        """Turn a kept sample θ (``buf["theta"]``) into the statistic (θ − m) ⊙ ĝ before it is combined."""
        version = buf.pop("theta", None)
        if version is None:
            return
        if p._version != version:
            raise RuntimeError("a parameter's mean was changed in place between its sample and step()")
        self._fused.stat_([buf["stat"]], [p.data], [grad])
