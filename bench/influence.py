"""Benchmark influence queries against training epochs: a batch of queries over N training examples, its cost in
epochs of IVON training on the same data (forward, backward, step at batch 128), all in one run.

    python bench/influence.py [--n 10000] [--queries 100] [--rounds 3]

The influence pass includes the sensitivity pass that gives each example's corrected residual; the two are also
printed apart (a worker that evaluates anyway has the second already).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivon_core import IVON  # noqa: E402
from sensitivity import compute_sensitivities, influence, ivon_variance  # noqa: E402
from sensitivity.influence import influence_form  # noqa: E402


def _data(n: int, d: int = 64, k: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    teacher = torch.randn(d, k, generator=g)
    y = (x @ teacher + 2.0 * torch.randn(n, k, generator=g)).argmax(1)
    return x, y


def _epoch(model: nn.Module, opt: IVON, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> float:
    t = time.perf_counter()
    for idx in torch.randperm(len(x)).split(batch):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x, y = _data(args.n)
    xq, _ = _data(args.queries, seed=1)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = IVON(model.parameters(), lr=0.1, ess=args.n, hess_init=0.3)
    _epoch(model, opt, x, y)  # warm-up
    epochs, passes, totals, leans = [], [], [], []
    for _ in range(args.rounds):  # the arms take turns: a busy machine slows them alike
        epochs.append(_epoch(model, opt, x, y))
        var = ivon_variance(opt, model)
        t = time.perf_counter()
        res = compute_sensitivities(model, (x, y), var, form=influence_form("auto", var))
        passes.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = influence(model, xq, (x, y), var, result=res)
        totals.append(time.perf_counter() - t + passes[-1])
        t = time.perf_counter()
        influence(model, xq, (x, y), var, result=res, outputs=False)
        leans.append(time.perf_counter() - t + passes[-1])
    epoch, sens, total, lean = (statistics.median(v) for v in (epochs, passes, totals, leans))
    p = sum(q.numel() for q in model.parameters())
    print(f"{args.queries} queries over N={args.n:,} training examples, MLP 64-128-10 (P={p:,}), "
          f"{torch.get_num_threads()} threads; epoch {epoch:.3f} s (median of {args.rounds})")
    print(f"   influence, sensitivity pass included  {total / epoch:6.2f}x epoch")
    print(f"   the sensitivity pass alone            {sens / epoch:6.2f}x epoch")
    print(f"   the influence pass alone              {(total - sens) / epoch:6.2f}x epoch "
          f"({tuple(out.output_change.shape)} output changes)")
    print(f"   loss changes only (outputs=False)     {lean / epoch:6.2f}x epoch, sensitivity pass included")
    return 0


if __name__ == "__main__":
    sys.exit(main())
