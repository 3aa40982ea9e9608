"""What a resume checkpoint holds of a running job, and how it is put back, so that a killed job resumes to the
same final weights: the weights, the optimizer (IVON's noise generators per rank), the scheduler, every rank's
random state, the data order, early stopping, the evaluation plan (``worker.cadence``), each example's latest
training loss and the calibration."""

from __future__ import annotations

import torch

from ivon_core import IVON
from worker import distributed as D


def capture(device: torch.device, model, opt, sched, gen, step: int, perm, es, cad, seen, cal) -> dict | None:
    """The job's state on rank 0 (None on the other ranks; every rank must call it: it gathers their random
    states)."""
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    mine = {"rng": torch.get_rng_state(), "cuda_rng": cuda_rng,
            "generators": opt.state_dict()["ivon"]["generators"] if isinstance(opt, IVON) else {}}
    ranks = D.gather(mine) if D.active() else None
    if D.rank() != 0:
        return None
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "gen": gen.get_state(), "step": step, "perm": perm,
            "early_stopping": es.state_dict(), "cadence": cad.state_dict(), "seen": seen.cpu(),
            "calibration": cal.state_dict(), "ranks": ranks}


def restore(ck: dict, device: torch.device, model, opt, sched, gen, es, cad, seen, cal) -> None:
    """Put ``capture``'s state back, each rank its own random state and noise (a checkpoint from another world size:
    rank 0's)."""
    model.load_state_dict(ck["model"])
    sd = ck["optimizer"]
    ranks = ck.get("ranks")
    if ranks is not None and len(ranks) == D.world() and isinstance(opt, IVON):
        sd = {**sd, "ivon": {**sd["ivon"], "generators": ranks[D.rank()]["generators"]}}  # this rank's noise
    opt.load_state_dict(sd)
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"] if ranks is None else ranks[D.rank()]["rng"])
    cuda_rng = ck.get("cuda_rng") if ranks is None else ranks[D.rank()].get("cuda_rng")
    if cuda_rng is not None and device.type == "cuda":  # IVON's noise on a GPU comes from its generator
        torch.cuda.set_rng_state(cuda_rng, device)
    gen.set_state(ck["gen"])
    es.load_state_dict(ck["early_stopping"])
    if ck.get("cadence") is not None:  # older checkpoints: none (the plan starts again)
        cad.load_state_dict(ck["cadence"])
        seen.copy_(ck["seen"])
    if ck.get("calibration") is not None:
        cal.load_state_dict(ck["calibration"])
