"""Benchmark the leave-one-out truth: batched Newton refits vs one L-BFGS refit per example, same examples.

Prints, per model (digits logistic regression, N = 1200; the validation's 64-32-10 tanh MLP, N = 300, δ = 3e-3):
seconds of each method, their ratio, and the largest differences of the refitted loss and logits.

    python bench/retrain.py [--examples 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research.setups import digits, mlp  # noqa: E402
from sensitivity.covariance import prior_from_weight_decay  # noqa: E402
from sensitivity.retrain import fit_map, leave_one_out  # noqa: E402


def case(kind: str, examples: int) -> None:
    split = digits(1200 if kind == "logreg" else 300, 0, torch.float64)
    torch.manual_seed(0)
    model = (nn.Linear(64, 10) if kind == "logreg" else mlp(64, 10, (32,), activation="tanh")).double()
    prior = 1.0 if kind == "logreg" else prior_from_weight_decay(3e-3, split.n)
    fit_map(model, split.xtr, split.ytr, prior_precision=prior, max_iter=1000)
    pick = list(range(0, split.n, split.n // examples))[:examples]
    out = {}
    for method in ("lbfgs", "newton"):
        t = time.perf_counter()
        out[method] = (*leave_one_out(model, split.xtr, split.ytr, pick, prior_precision=prior, method=method),
                       time.perf_counter() - t)
    (df_l, loss_l, t_l), (df_n, loss_n, t_n) = out["lbfgs"], out["newton"]
    print(f"{kind:7s} {examples} examples: lbfgs {t_l:.1f} s, newton {t_n:.1f} s ({t_l / t_n:.1f}x faster); "
          f"LOO {float(loss_l.mean()):.4f} / {float(loss_n.mean()):.4f}; max |loss diff| "
          f"{float((loss_l - loss_n).abs().max()):.1e}, max |logit diff| {float((df_l - df_n).abs().max()):.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=30)
    ap.add_argument("--cases", default="logreg,mlp")
    args = ap.parse_args()
    for kind in args.cases.split(","):
        case(kind, args.examples)


if __name__ == "__main__":
    main()
