"""Benchmark IVON against torch.optim.AdamW(foreach=True) and the official ivon-opt, from one run.

Prints ratios against baselines measured in the same run (absolute times on shared machines mean little):
  1. optimizer work (sample + restore + step; AdamW: step) on a ResNet-18-size model (11.2M parameters),
     with synthetic gradients so that only optimizer work is timed;
  2. a full training step (forward, backward, optimizer) of ResNet-18 on 32×32 inputs at batch 128;
  3. peak extra memory in parameter copies, each optimizer in a fresh subprocess (peak RSS above the model).

    python bench/optimizer.py [--quick] [--device cuda]

"ivon" is the default, which on this CPU model chooses the fused kernels with counter noise (their compilation is
in the untimed warm-up); on CPU "ivon-unfused" (``fused=False, noise="torch"``: the multi-tensor path drawing
torch's numbers, as ivon-opt) and "ivon-fused-torch" (``noise="torch"``) are measured beside it.

On CUDA the clocks are read after a synchronize and memory is the peak of torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivon_core import IVON  # noqa: E402
from ivon_core.noise import counter_normal  # noqa: E402
from worker.models import resnet18  # noqa: E402

try:
    import ivon as ivon_opt
except ImportError:  # the dev extra installs it
    ivon_opt = None

DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_optimizer(name: str, params, n_train: int = 50_000):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, foreach=True)
    if name == "ivon":
        return IVON(params, lr=0.1, ess=n_train, hess_init=0.5)
    if name == "ivon-unfused":
        return IVON(params, lr=0.1, ess=n_train, hess_init=0.5, fused=False, noise="torch")
    if name == "ivon-fused-torch":
        return IVON(params, lr=0.1, ess=n_train, hess_init=0.5, noise="torch")
    if name == "ivon-opt":
        return ivon_opt.IVON(params, lr=0.1, ess=n_train, hess_init=0.5)
    raise ValueError(name)


def optimizer_work(model: nn.Module, opt, grads: list[torch.Tensor]) -> float:
    """Seconds of one optimizer iteration with gradients copied in (the copy is not timed)."""
    params = list(model.parameters())
    if isinstance(opt, torch.optim.AdamW):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        _sync()
        t = time.perf_counter()
        opt.step()
        _sync()
        return time.perf_counter() - t
    _sync()
    t = time.perf_counter()
    with opt.sampled_params(train=True):
        _sync()
        pause = time.perf_counter()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        _sync()
        t += time.perf_counter() - pause
    opt.step()
    _sync()
    return time.perf_counter() - t


def train_step(model: nn.Module, opt, x, y) -> float:
    _sync()
    t = time.perf_counter()
    if isinstance(opt, torch.optim.AdamW):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
    else:
        with opt.sampled_params(train=True):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    _sync()
    return time.perf_counter() - t


def _draw_only(out: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> None:
    out.copy_(counter_normal(out.numel(), k1, k2))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(names: list[str], run, rounds: int, paired: dict[str, float] | None = None) -> dict[str, float]:
    """Median seconds per name, the names taking turns so that machine noise hits them alike; into ``paired``, the
    median of each round's ratio to the first name (a slow phase of the machine then cancels within the round)."""
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            times[n].append(run(n))
    if paired is not None:
        paired.update({n: statistics.median(t / b for t, b in zip(v, times[names[0]])) for n, v in times.items()})
    return {n: statistics.median(v) for n, v in times.items()}


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(name: str) -> None:
    """In a fresh process: peak RSS (CUDA: allocated memory) during 3 iterations above the model's, in copies."""
    torch.manual_seed(0)
    model = resnet18().to(DEVICE)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]  # a stash; the clones below are the grads
    opt = make_optimizer(name, model.parameters())
    if DEVICE.type == "cpu" and name in ("ivon", "ivon-fused-torch"):  # compile on a small model first: the
        # compiler's memory does not scale

        small = nn.Linear(512, 256)
        warm = make_optimizer(name, small.parameters())
        with warm.sampled_params(train=True):
            small(torch.randn(4, 512)).sum().backward()
        warm.step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _peak_rss_bytes()
    for _ in range(3):
        for p in model.parameters():
            p.grad = None
        if isinstance(opt, torch.optim.AdamW):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
        else:
            with opt.sampled_params(train=True):
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone()
            opt.step()
    peak = torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else _peak_rss_bytes()
    print(json.dumps({"copies": (peak - base) / nbytes}))


def peak_copies(name: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, "--device", str(DEVICE)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["copies"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds (for smoke tests)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    torch.manual_seed(0)
    fused = ["ivon-unfused", "ivon-fused-torch"] if DEVICE.type == "cpu" else []  # fused kernels: CPU tensors
    names = ["adamw", "ivon", *fused] + (["ivon-opt"] if ivon_opt is not None else [])
    rounds = 5 if args.quick else 21
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}")

    models = {n: resnet18().to(DEVICE) for n in names}
    for m in models.values():
        m.load_state_dict(models["adamw"].state_dict())
    n_params = sum(p.numel() for p in models["adamw"].parameters())
    opts = {n: make_optimizer(n, models[n].parameters()) for n in names}
    grads = [torch.randn_like(p) * 1e-3 for p in models["adamw"].parameters()]
    for n in names:  # warm up: state allocation (and the fused kernels' compilation) happens on the first step
        optimizer_work(models[n], opts[n], grads)
    chosen = opts["ivon"]
    print(f"the default chose noise={chosen.noise!r}, fused={chosen._fused is not None}")
    work = interleaved(names, lambda n: optimizer_work(models[n], opts[n], grads), rounds)
    print(f"\n1. optimizer work, {n_params / 1e6:.1f}M parameters (median of {rounds}):")
    for n in names:
        print(f"   {n:16s} {work[n] * 1e3:8.1f} ms   {work[n] / work['adamw']:5.2f}x AdamW(foreach)")
    if "ivon-opt" in work:
        for n in ["ivon", *fused]:
            print(f"   {n} is {work['ivon-opt'] / work[n]:.1f}x faster than ivon-opt   (goals: <= 1.5x AdamW, >= 5x)")

    if DEVICE.type == "cpu":  # how much of the default's work is the Gaussian draw alone (compute, not memory)
        draw = torch.compile(_draw_only, dynamic=True)
        out = torch.empty(n_params)
        keys = [torch.tensor(v, dtype=torch.int32) for v in (1, 2)]
        draw(out, *keys)
        t_draw = interleaved(["draw"], lambda _: _timed(lambda: draw(out, *keys)), rounds)["draw"]
        print(f"   of which drawing {n_params / 1e6:.1f}M Gaussian numbers alone (compiled, counter): "
              f"{t_draw * 1e3:.1f} ms, {t_draw / work['adamw']:.2f}x AdamW")

    step_names = ["adamw", "ivon", *fused]
    x, y = torch.randn(128, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (128,), device=DEVICE)
    for n in step_names:
        train_step(models[n], opts[n], x, y)
    rounds, ratios = (3 if args.quick else 11), {}
    steps = interleaved(step_names, lambda n: train_step(models[n], opts[n], x, y), rounds, paired=ratios)
    print(f"\n2. full train step, ResNet-18 (GroupNorm), batch 128, 32x32 (median of {rounds}; paired: the median of "
          "each round's ratio to AdamW's step):")
    for n in step_names:
        print(f"   {n:16s} {steps[n] * 1e3:8.0f} ms   {steps[n] / steps['adamw']:5.3f}x AdamW   paired "
              f"{ratios[n]:5.3f}x   (goal: <= 1.03x)")

    print("\n3. peak extra memory in parameter copies (gradients included; fresh process each):")
    for n in names:
        print(f"   {n:16s} {peak_copies(n):5.2f}   (goal for ivon: <= 4.5)")


if __name__ == "__main__":
    main()
