"""Data-parallel jobs under ``torchrun`` (gloo on CPU, nccl on GPUs).

Every rank holds the whole model and data set and takes its share of each batch; IVON averages gradients and
Hessian estimates over ranks (``sync=True``) while each rank draws its own noise, so W ranks act as W Monte Carlo
samples per step. The sensitivity pass is sharded by example and gathered on rank 0, which alone touches the
store, the checkpoint files and the hooks, and tells the other ranks whether to go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import fields
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sensitivity import SensitivityResult


def init_from_env() -> bool:
    """Join the process group that torchrun's environment describes; True when there is more than one rank.

    Where GPUs are present, CPU tensors and objects go through gloo and CUDA tensors through nccl, so a job that
    trains on the CPU of a GPU machine works too.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if _gpu_per_local_rank():
            torch.cuda.set_device(_local_rank())
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return True


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _gpu_per_local_rank() -> bool:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return torch.cuda.is_available() and torch.cuda.device_count() >= local


def claimable_devices() -> list[str]:
    """The ``device`` settings this worker (all its local ranks) can place a job on."""
    out = ["auto", "cpu"]
    if _gpu_per_local_rank():
        out.append("cuda")
    if torch.cuda.is_available() and not under_torchrun():  # one named GPU cannot serve several ranks
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out


def resolve_device(spec: str) -> torch.device:
    """The device a job's ``device`` setting names, for this rank; ValueError when it is not present."""
    if spec == "auto":
        return torch.device("cuda", _local_rank()) if _gpu_per_local_rank() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: no CUDA device is available to this worker (torch "
                         f"{torch.__version__}); use 'cpu' or 'auto'")
    index = int(spec.split(":")[1]) if ":" in spec else (_local_rank() if under_torchrun() else 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r}: this worker sees {torch.cuda.device_count()} CUDA device(s), "
                         f"no cuda:{index}")
    return torch.device("cuda", index)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def shutdown() -> None:
    if active():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank without interpreter finalization, output flushed.

    gloo's worker threads can still hold tensors after ``destroy_process_group``; releasing them while the
    interpreter is torn down aborts the process now and then ("terminate called without an active exception",
    SIGABRT; pytorch/pytorch#179291), which would turn a finished rank into a failed one.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def broadcast(obj=None):
    """Rank 0's ``obj`` on every rank (picklable objects; the identity without torch.distributed)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(idx: Tensor) -> Tensor:
    """This rank's share of ``idx`` (every world-th element)."""
    return idx[rank() :: world()] if active() else idx


def mean(value: float) -> float:
    """The mean of a scalar over ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world()


def average_gradients(model: nn.Module) -> None:
    """Average .grad over ranks (what IVON's ``sync`` does for itself; needed for AdamW and SGD)."""
    if not active():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def all_gather(obj) -> list:
    """Every rank's ``obj`` on every rank (in rank order)."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def gather(obj) -> list | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
    if not active():
        return [obj]
    out = [None] * world() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def merge_filled(values: Tensor) -> Tensor | None:
    """Rank 0: ``values`` with each NaN filled from the ranks that hold a number there (None on other ranks);
    the tensor itself without torch.distributed."""
    if not active():
        return values
    parts = gather(values.cpu())
    if parts is None:
        return None
    out = parts[0].clone()
    for part in parts[1:]:
        out = torch.where(torch.isnan(out), part, out)
    return out.to(values.device)


def gather_result(res: SensitivityResult) -> SensitivityResult | None:
    """The ranks' sensitivity shards joined on rank 0, in order of example index; None on other ranks."""
    if not active():
        return res
    parts = gather({f.name: getattr(res, f.name) for f in fields(res)})
    if parts is None:
        return None
    joined = {}
    for name, value in parts[0].items():
        if isinstance(value, Tensor):
            joined[name] = torch.cat([p[name] for p in parts])
        elif value is None or name in ("form", "loss", "max_amplification"):
            joined[name] = value
        elif name == "scale_parts":
            joined[name] = {k: torch.cat([p[name][k] for p in parts]) for k in value}
        else:
            joined[name] = {k: v for p in parts for k, v in (p[name] or {}).items()}
    order = torch.argsort(joined["indices"])
    for name, value in joined.items():
        if isinstance(value, Tensor) and len(value) == len(order):
            joined[name] = value[order]
    if joined.get("scale_parts"):
        joined["scale_parts"] = {k: v[order] for k, v in joined["scale_parts"].items()}
    return SensitivityResult(**joined)
