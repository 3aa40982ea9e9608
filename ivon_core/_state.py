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
