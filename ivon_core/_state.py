"""Helpers for IVON's saved and shared state: checking a state_dict's layout, averaging across ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def check_layout(state_dict: dict[str, Any], param_groups: list[dict]) -> None:
    """Refuse a state_dict saved for other parameter groups, counts or shapes, saying what differs."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this optimizer has {len(param_groups)}")
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"parameter group {gi}: state_dict has {len(saved['params'])} parameters, "
                f"this optimizer has {len(group['params'])}"
            )
        for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            st = state_dict["state"].get(pid)
            if st is not None and "hess" in st and tuple(st["hess"].shape) != tuple(p.shape):
                raise ValueError(
                    f"parameter group {gi}, parameter {pi}: state_dict shape {tuple(st['hess'].shape)} "
                    f"differs from the parameter's {tuple(p.shape)}"
                )


def all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average tensors over ranks in place, through one flat buffer per dtype."""
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(ts)
        dist.all_reduce(flat)
        flat.div_(world)
        for t, f in zip(ts, torch._utils._unflatten_dense_tensors(flat, ts)):
            t.copy_(f)


def bind_group(state: dict, group: dict, dtype_of) -> None:
    """Lay out the group's Hessian and momentum as ivon-opt does, one flat vector each (``group["hess"]``,
    ``group["momentum"]``, ``group["numel"]``), with each parameter's state a view into them: the two stay in sync
    without copies. Covered: the group's trainable parameters and any that hold state, in order (frozen parameters
    hold none; ivon-opt allocates theirs). A group mixing devices or state dtypes keeps separate tensors and has no
    flat vectors (ivon-opt refuses such groups)."""
    ps = [p for p in group["params"] if p.requires_grad or state.get(p)]
    for key in ("hess", "momentum"):
        group.pop(key, None)
    group["numel"] = sum(p.numel() for p in ps)
    if not ps:
        return
    layouts = {(p.device, dtype_of(p)) for p in ps}
    flat = len(layouts) == 1
    if flat:
        device, dtype = next(iter(layouts))
        hess = torch.empty(group["numel"], dtype=dtype, device=device)
        momentum = torch.empty(group["numel"], dtype=dtype, device=device)
    offset = 0
    for p in ps:
        st = state[p]
        n = p.numel()
        if flat:
            h, m = hess[offset : offset + n].view(p.shape), momentum[offset : offset + n].view(p.shape)
        else:
            h = torch.empty(p.shape, dtype=dtype_of(p), device=p.device)
            m = torch.empty_like(h)
        if "hess" in st:
            h.copy_(st["hess"].reshape(p.shape))
            m.copy_(st["momentum"].reshape(p.shape))
        else:
            h.fill_(float(group["hess_init"]))
            m.zero_()
            st["step"] = torch.zeros((), dtype=torch.float32)
        st["hess"], st["momentum"] = h, m
        offset += n
    if flat:
        group["hess"], group["momentum"] = hess, momentum
