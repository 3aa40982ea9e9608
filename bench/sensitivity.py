"""Benchmark a full sensitivity pass against one training epoch and against the naive Jacobian route.

All ratios come from one run: an epoch (forward, backward and IVON step at batch 128 over the same N examples),
the first-order, corrected, second-order and Rayleigh passes (the library's default chunking), the naive vmap(jacrev)
reference, and the K-FAC fit (one MC direction); they take turns, median of the rounds.

    python bench/sensitivity.py [--quick] [--device cuda] [--cases mlp10,mlp100,resnet10,resnet100,malloc,layers]
                                [--system-malloc]

The process keeps freed memory in its heap as the worker does (``worker.allocator``), for every arm alike;
``--system-malloc`` measures with glibc's defaults instead.

``--cases malloc``: the ResNet-20 epoch and first-order pass alone in a fresh process, with glibc's default malloc and
with the worker's heap setting (other arms in one process warm glibc's heap and hide the difference).

``--cases layers``: the first-order pass on ResNet-18 (11M parameters) by the per-layer route against the generic
per-example route, time and peak memory, each in a fresh process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sensitivity.deviations as D  # noqa: E402
from ivon_core import IVON  # noqa: E402
from sensitivity import (
    compute_sensitivities,  # noqa: E402
    ivon_variance,  # noqa: E402
)
from sensitivity.covariance import (  # noqa: E402
    BlockCovariance,
    DenseCovariance,
    KFACCovariance,
    last_layer_params,
)
from worker.allocator import keep_heap  # noqa: E402
from worker.models import mlp, resnet20  # noqa: E402

DEVICE = torch.device("cpu")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(_once(fn) for _ in range(repeats))


def _once(fn) -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def epoch(model, opt, x, y, batch=128):
    for s in range(0, len(x), batch):
        with opt.sampled_params(train=True):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[s : s + batch]), y[s : s + batch]).backward()
        opt.step()


def naive(model, x, y, var, chunk):
    """V_i from materialized Jacobians (K × P per example), first-order deviation."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat_var = torch.cat([v.flatten() for v in var])

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    for s in range(0, len(x), chunk):
        xb = x[s : s + chunk]
        jac = vmap(jacrev(f), (None, 0))(params, xb)
        j = torch.cat([jac[n].flatten(2) for n in params], 2)
        v = torch.einsum("bkp,p,blp->bkl", j, flat_var, j)
        e = torch.softmax(f(params, xb[0])[None], -1)
        _ = v @ e[..., None]


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per name after a warm-up, the names taking turns so that machine noise hits them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_once(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def first_order_unsplit(model, x, y, var):
    """The first-order pass without the CPU's activation-bounded parts (one part per chunk of 256)."""
    saved = dict(D.ACTIVATION_BUDGET)
    D.ACTIVATION_BUDGET.clear()
    try:
        compute_sensitivities(model, (x, y), var, form="first_order")
    finally:
        D.ACTIVATION_BUDGET.update(saved)


def case(name, model, x, y, repeats, with_naive=True):
    n = len(x)
    opt = IVON(model.parameters(), lr=0.1, ess=n, hess_init=0.5)
    var = [v for v in opt.variances()]
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())

    def block_pass():  # sensitivity.covariance: optimizer_with_last_layer
        head = DenseCovariance.last_layer(model, (x, y), prior_precision=1.0)
        cov = BlockCovariance.with_last_layer(model, ivon_variance(opt, model), head)
        compute_sensitivities(model, (x, y), cov)

    fns = {
        "epoch": lambda: epoch(model, opt, x, y),
        "first": lambda: compute_sensitivities(model, (x, y), var, form="first_order"),
        "corr": lambda: compute_sensitivities(model, (x, y), var, form="corrected"),
        "second": lambda: compute_sensitivities(model, (x, y), var, form="second_order"),
        "rayleigh": lambda: compute_sensitivities(model, (x, y), var, form="rayleigh"),
        "kfac": lambda: KFACCovariance.fit(model, (x, y), prior_precision=1.0, chunk_size=256),
    }
    params = dict(model.named_parameters())
    head_size = sum(params[n].numel() for n in last_layer_params(model))
    if head_size <= 8192:  # a dense Σ of the head: 25.7K parameters (K = 100 on 256 features) take minutes
        fns.update(head=lambda: DenseCovariance.last_layer(model, (x, y), prior_precision=1.0), block=block_pass)
    if has_conv:
        fns["whole"] = lambda: first_order_unsplit(model, x, y, var)
        fns["reduce"] = lambda: KFACCovariance.fit(model, (x, y), prior_precision=1.0, chunk_size=256, conv="reduce")
    t = interleaved(fns, repeats)
    t_epoch, t_first, t_corr, t_kfac = (t[k] for k in ("epoch", "first", "corr", "kfac"))
    t_reduce = t.get("reduce")
    k = int(model(x[:1]).shape[1])
    print(f"\n{name}: N={n}, K={k}, P={sum(p.numel() for p in model.parameters()):,}, epoch {t_epoch:.3f} s")
    print(f"   first order   {t_first / t_epoch:6.2f}x epoch" + ("" if "whole" not in t else
          f" (without the CPU's activation-bounded parts: {t['whole'] / t_epoch:.2f}x)"))
    print(f"   corrected     {t_corr / t_epoch:6.2f}x epoch")
    print(f"   second order  {t['second'] / t_epoch:6.2f}x epoch (the corrected form's series to two terms)")
    print(f"   rayleigh      {t['rayleigh'] / t_epoch:6.2f}x epoch (that series summed geometrically; the default "
          "with IVON's σ²)")
    if "head" in t:
        print(f"   last-layer Laplace fit {t['head'] / t_epoch:.2f}x epoch; IVON body + that head, whole first-order "
              f"pass {t['block'] / t_epoch:.2f}x")
    else:
        print(f"   last-layer Laplace: skipped (a dense Σ of {head_size:,} head parameters)")
    print(f"   K-FAC fit     {t_kfac / t_epoch:6.2f}x epoch" + ("" if t_reduce is None else
          f"; conv=\"reduce\" {t_reduce / t_epoch:.2f}x epoch"))
    if with_naive:
        t_naive = timed(lambda: naive(model, x, y, var, 64), max(1, repeats // 2))
        print(f"   naive (jacrev) {t_naive / t_epoch:5.2f}x epoch: first order is {t_naive / t_first:.1f}x faster, "
              f"corrected {t_naive / t_corr:.1f}x")


def layers_child(fast: bool, n: int) -> None:
    import json
    import resource

    from worker.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).to(DEVICE)
    x, y = torch.randn(n, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (n,), device=DEVICE)
    var = [torch.rand_like(p) * 1e-4 for p in model.parameters()]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    compute_sensitivities(model, (x, y), var, form="first_order", fast=fast, chunk_size=n)
    print(json.dumps({"s": time.perf_counter() - t,
                      "mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))


def malloc_child(n: int) -> None:
    import json

    torch.manual_seed(0)
    model = resnet20(10).to(DEVICE)
    x, y = torch.randn(n, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (n,), device=DEVICE)
    opt = IVON(model.parameters(), lr=0.1, ess=n, hess_init=0.5)
    var = list(opt.variances())
    t = interleaved({"epoch": lambda: epoch(model, opt, x, y),
                     "first": lambda: compute_sensitivities(model, (x, y), var, form="first_order")}, 3)
    print(json.dumps(t))


def malloc_case(n: int) -> None:
    import json
    import os
    import subprocess

    out = {}
    for choice in ("system", "heap"):
        run = subprocess.run([sys.executable, __file__, "--malloc-child", "--n-cnn", str(n)], capture_output=True,
                             text=True, check=True, env=dict(os.environ, IVON_DIAG_MALLOC=choice))
        out[choice] = json.loads(run.stdout.strip().splitlines()[-1])
    s, h = out["system"], out["heap"]
    print(f"\nResNet-20 K = 10, N = {n}, fresh process each: glibc's defaults: epoch {s['epoch']:.3f} s, first order "
          f"{s['first']:.3f} s ({s['first'] / s['epoch']:.2f}x); heap kept: epoch {h['epoch']:.3f} s, first order "
          f"{h['first']:.3f} s ({h['first'] / h['epoch']:.2f}x); first order {s['first'] / h['first']:.2f}x faster, "
          f"epoch {s['epoch'] / h['epoch']:.2f}x")


def layers_case(n: int) -> None:
    import json
    import subprocess

    out = {}
    for fast in (True, False):
        run = subprocess.run([sys.executable, __file__, "--layers-child", str(int(fast)), "--n-cnn", str(n)],
                             capture_output=True, text=True, check=True)
        out[fast] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\nResNet-18 first order, N = chunk = {n}: per-layer route {out[True]['s']:.1f} s, "
          f"{out[True]['mb']:.0f} MB peak; generic {out[False]['s']:.1f} s, {out[False]['mb']:.0f} MB "
          f"({out[False]['s'] / out[True]['s']:.2f}x the time, {out[False]['mb'] / out[True]['mb']:.2f}x the memory)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--n-cnn", type=int, default=None, help="examples for the ResNet-20 cases (default 512; quick 128)")
    ap.add_argument("--cases", default="mlp10,mlp100,resnet10,resnet100", help="comma-separated subset to run")
    ap.add_argument("--system-malloc", action="store_true", help="glibc's defaults, not the worker's heap setting")
    ap.add_argument("--layers-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--malloc-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    heap = not args.system_malloc and keep_heap()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.layers_child is not None:
        layers_child(bool(args.layers_child), args.n_cnn or 64)
        return
    if args.malloc_child:
        malloc_child(args.n_cnn or 512)
        return
    reps = 1 if args.quick else 3
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    malloc = "heap kept" if heap else "glibc malloc defaults"
    print(f"torch {torch.__version__}, {where}, {malloc}; goals at K=10: first order <= 2.5x, "
          "corrected <= 4x an epoch, >= 5x faster than naive, K-FAC fit <= 1x")
    n_mlp = 1024 if args.quick else 4096
    cases = set(args.cases.split(","))
    for k in (10, 100):
        if f"mlp{k}" not in cases:
            continue
        x, y = torch.randn(n_mlp, 64, device=DEVICE), torch.randint(0, k, (n_mlp,), device=DEVICE)
        case(f"MLP 64-256-256-{k}", mlp(64, k, (256, 256)).to(DEVICE), x, y, reps)
    n_cnn = args.n_cnn or (128 if args.quick else 512)
    for k in (10, 100):
        if f"resnet{k}" not in cases:
            continue
        x, y = torch.randn(n_cnn, 3, 32, 32, device=DEVICE), torch.randint(0, k, (n_cnn,), device=DEVICE)
        case(f"ResNet-20 (GroupNorm) {k} classes", resnet20(k).to(DEVICE), x, y, reps, with_naive=k == 10)
    if "malloc" in cases:
        malloc_case(n_cnn)
    if "layers" in cases:
        layers_case(32 if args.quick else 64)


if __name__ == "__main__":
    main()
