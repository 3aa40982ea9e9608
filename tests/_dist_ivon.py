"""Run by tests/test_ivon_distributed.py under torchrun: IVON with sync=True on 2 gloo ranks."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from ivon_core import IVON


def main(out_path: str, noise: str = "torch", size: str = "small") -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same seed everywhere: the optimizer must still draw per-rank noise
    # large: a 256x256 weight, which the default updates with the fused kernels and counter noise
    width = 256 if size == "large" else 8
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2))
    opt = IVON(model.parameters(), lr=0.05, ess=64, beta2=0.9, sync=True, noise=noise)
    watched = [model[0].weight, model[2].weight]
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 2, (16,), generator=g)
    report = {}
    for _ in range(3):
        with opt.sampled_params(train=True):
            sample = torch.cat([w.detach().flatten() for w in watched])
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grad = torch.cat([w.grad.flatten() for w in watched])
        samples = [torch.empty_like(sample) for _ in range(world)]
        dist.all_gather(samples, sample)
        grads = [torch.empty_like(grad) for _ in range(world)]
        dist.all_gather(grads, grad)
        mom_before = torch.cat([opt.state[w]["momentum"].flatten() for w in watched])
        opt.step()
        expect = 0.9 * mom_before + 0.1 * torch.stack(grads).mean(0)
        report.setdefault("noise_differs", []).append(not torch.equal(samples[0], samples[1]))
        report.setdefault("momentum_is_rank_mean", []).append(
            torch.allclose(torch.cat([opt.state[w]["momentum"].flatten() for w in watched]), expect, atol=1e-7))
    report["noise_kind"], report["fused"] = opt.noise, opt._fused is not None
    flat = torch.cat([p.detach().flatten() for p in model.parameters()] +
                     [opt.state[p]["hess"].flatten() for p in model.parameters()])
    all_flat = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(all_flat, flat)
    report["ranks_agree"] = all(torch.equal(all_flat[0], f) for f in all_flat)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip finalization: gloo's threads may still hold tensors (see worker.distributed.exit_rank)


if __name__ == "__main__":
    main(*sys.argv[1:4])
