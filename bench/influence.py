"""Benchmark influence queries against training epochs: a batch of queries over N training examples, its cost in
epochs of IVON training on the same data (forward, backward, step at batch 128), all in one run.

    python bench/influence.py [--n 10000] [--queries 100] [--rounds 3] [--model mlp|cnn]

Each arm is a whole query: the first-order form (``influence``'s choice with IVON's σ²) needs no sensitivity pass;
the Rayleigh form first runs one for each example's corrected residual. The product runs at oneDNN's bf16 float32
math unless an arm says strict; the last lines give that product's error against the strict one on the same query.
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
from sensitivity import influence, ivon_variance  # noqa: E402
from worker.models import small_cnn  # noqa: E402


def _data(n: int, shape: tuple[int, ...], k: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    teacher = torch.randn(x[0].numel(), k, generator=torch.Generator().manual_seed(99))
    y = (x.flatten(1) @ teacher + 2.0 * torch.randn(n, k, generator=g)).argmax(1)
    return x, y


MODELS = {  # name → (input shape, model, description)
    "mlp": ((64,), lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), "MLP 64-128-10"),
    "cnn": ((3, 32, 32), lambda: small_cnn(3, 10, 32), "the product's small CNN on 3×32×32 images"),
}


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
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shape, make, described = MODELS[args.model]
    x, y = _data(args.n, shape)
    xq, _ = _data(args.queries, shape, seed=1)
    model = make()
    opt = IVON(model.parameters(), lr=0.1, ess=args.n, hess_init=0.3)
    _epoch(model, opt, x, y)  # warm-up
    arms = {  # name → one query batch, timed whole (any sensitivity pass its form needs included)
        "a worker's query: loss changes, first order (auto)": lambda var: influence(model, xq, (x, y), var,
                                                                                 outputs=False),
        "the same, strict float32 product": lambda var: influence(model, xq, (x, y), var, outputs=False,
                                                                   fp32_precision="ieee"),
        "every output change, first order (auto)": lambda var: influence(model, xq, (x, y), var),
        "loss changes, Rayleigh form (a sensitivity pass first)": lambda var: influence(model, xq, (x, y), var,
                                                                                       form="rayleigh", outputs=False),
    }
    epochs, times = [], {name: [] for name in arms}
    for _ in range(args.rounds):  # the arms take turns: a busy machine slows them alike
        epochs.append(_epoch(model, opt, x, y))
        var = ivon_variance(opt, model)
        for name, run in arms.items():
            t = time.perf_counter()
            run(var)
            times[name].append(time.perf_counter() - t)
    epoch = statistics.median(epochs)
    p = sum(q.numel() for q in model.parameters())
    print(f"{args.queries} queries over N={args.n:,} training examples, {described} (P={p:,}), "
          f"{torch.get_num_threads()} threads; epoch {epoch:.3f} s (median of {args.rounds})")
    for name, ts in times.items():
        print(f"   {name:<58} {statistics.median(ts) / epoch:6.2f}x epoch")
    macs = args.queries * args.n * p
    print(f"   (the query rows × per-example gradients product alone: {macs / 1e9:.1f} G multiply-adds)")
    fast, strict = (influence(model, xq, (x, y), var, outputs=False, fp32_precision=m).loss_change
                    for m in ("bf16", "ieee"))
    err = ((fast - strict).abs().amax(1) / strict.abs().amax(1)).max().item()
    top = statistics.mean(len(set(fast[q].topk(10).indices.tolist()) & set(strict[q].topk(10).indices.tolist()))
                          for q in range(len(strict)))
    print(f"   bf16 float32 math vs strict: largest error {err:.1e} of a query's largest |change|; "
          f"top-10 proponents shared {top:.2f} of 10")
    return 0


if __name__ == "__main__":
    sys.exit(main())
