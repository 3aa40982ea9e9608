"""How far influence queries follow retraining: the predicted change of test examples' losses when each training
example is removed, against refitting without it, for each covariance; and whether removing an example set chosen
by influence moves a test prediction more than one chosen by TracIn or at random. Writes docs/influence.md:

    python -m research.influence
"""

from __future__ import annotations

import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

from research.setups import digits
from sensitivity import DenseCovariance, KFACCovariance, influence, sgd_variance
from sensitivity.retrain import fit_map

OUT = Path(__file__).parents[1] / "docs" / "influence.md"
PRIOR = 1.0
REMOVE = 10  # examples removed per query in the removal test


def _setup(n_train: int, n_queries: int, seed: int):
    split = digits(n_train=n_train, seed=seed, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    fit_map(model, split.xtr, split.ytr, prior_precision=PRIOR)
    return model, split.xtr, split.ytr, split.xte[:n_queries]


def _losses(model: nn.Module, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(xq), yq, reduction="none")


def _refit_without(model, x, y, drop) -> nn.Module:
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[list(drop)] = False
    return fit_map(copy.deepcopy(model), x[keep], y[keep], prior_precision=PRIOR)


def _tracin(model: nn.Module, x, y, xq, yq) -> torch.Tensor:
    """TracIn at the final weights (one checkpoint): ∇ℓ(query) · ∇ℓ_i, (Q, N); positive: a proponent."""
    params = [p for p in model.parameters()]

    def grads(xs, ys):
        out = []
        for i in range(len(xs)):
            g = torch.autograd.grad(nn.functional.cross_entropy(model(xs[i : i + 1]), ys[i : i + 1]), params)
            out.append(torch.cat([t.flatten() for t in g]))
        return torch.stack(out)

    return grads(xq, yq) @ grads(x, y).T


def faithfulness(n_train: int = 150, n_queries: int = 10, seed: int = 0) -> tuple[list[dict], list[dict], dict]:
    model, x, y, xq = _setup(n_train, n_queries, seed)
    with torch.no_grad():
        yq = model(xq).argmax(1)  # the predicted labels, as a query without a label
    base = _losses(model, xq, yq)
    t = time.perf_counter()
    actual = torch.stack([_losses(_refit_without(model, x, y, [i]), xq, yq) - base for i in range(len(x))], 1)
    refit_s = time.perf_counter() - t
    covs = {
        "dense Laplace (exact GGN), corrected": (DenseCovariance.laplace(model, (x, y), prior_precision=PRIOR),
                                                 "corrected"),
        "dense Laplace, first order": (DenseCovariance.laplace(model, (x, y), prior_precision=PRIOR), "first_order"),
        "K-FAC, first order": (KFACCovariance.fit(model, (x, y), prior_precision=PRIOR, mc_samples=None),
                               "first_order"),
        "last-layer Laplace, corrected": (DenseCovariance.last_layer(model, (x, y), prior_precision=PRIOR),
                                          "corrected"),
        "diagonal Laplace (what IVON's σ² estimates), Rayleigh": (
            sgd_variance(model, (x, y), prior_precision=PRIOR), "rayleigh"),
    }
    rows, results = [], {}
    for name, (cov, form) in covs.items():
        t = time.perf_counter()
        res = influence(model, xq, (x, y), cov, form=form)
        seconds = time.perf_counter() - t
        results[name] = res
        pred, true = res.loss_change.flatten().numpy(), actual.flatten().numpy()
        per_query = [pearsonr(res.loss_change[q].numpy(), actual[q].numpy())[0] for q in range(len(xq))]
        rows.append({"covariance": name, "pearson": float(pearsonr(pred, true)[0]),
                     "spearman": float(spearmanr(pred, true)[0]), "median_query_pearson": float(np.median(per_query)),
                     "seconds": seconds})
    tracin = _tracin(model, x, y, xq, yq)
    gen = torch.Generator().manual_seed(seed)
    choosers = {
        "influence, dense Laplace": lambda q: results["dense Laplace (exact GGN), corrected"].proponents(q, REMOVE)[0],
        "influence, diagonal Laplace": lambda q: results[
            "diagonal Laplace (what IVON's σ² estimates), Rayleigh"].proponents(q, REMOVE)[0],
        "TracIn (final weights)": lambda q: torch.argsort(tracin[q], descending=True)[:REMOVE],
        "random": lambda q: torch.randperm(len(x), generator=gen)[:REMOVE],
    }
    removal = []
    for name, choose in choosers.items():
        rises, flips = [], 0
        for q in range(len(xq)):
            refit = _refit_without(model, x, y, choose(q).tolist())
            rises.append(float(_losses(refit, xq[q : q + 1], yq[q : q + 1])[0] - base[q]))
            with torch.no_grad():
                flips += int(refit(xq[q : q + 1]).argmax(1)) != int(yq[q])
        removal.append({"chooser": name, "mean_rise": float(np.mean(rises)), "median_rise": float(np.median(rises)),
                        "flips": flips})
    info = {"n_train": len(x), "n_queries": len(xq), "params": sum(p.numel() for p in model.parameters()),
            "refit_s": refit_s}
    return rows, removal, info


def report(rows: list[dict], removal: list[dict], info: dict, seconds: float) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Influence queries against retraining", "",
        f"Generated by `python -m research.influence` on {when} ({platform.machine()}, {torch.get_num_threads()} "
        f"threads, {seconds:.0f} s); do not edit by hand. Exactness against a naive Jacobian reference for every form "
        "and covariance: `tests/test_influence.py`; speed: `python bench/influence.py`.", "",
        f"sklearn's digits, {info['n_train']} training images, an MLP 64-12-10 (tanh, {info['params']} parameters) "
        f"at its MAP (L-BFGS, prior precision {PRIOR:g}), float64. For each of {info['n_queries']} test images (at "
        "their predicted labels) and each training example: the predicted change of the test image's loss when the "
        "example is removed (`sensitivity.influence`), against the change after refitting without it (warm-started "
        f"L-BFGS, {info['refit_s']:.0f} s for all refits).", "",
        "| covariance, form | Pearson | Spearman | median Pearson per test image | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['covariance']} | {r['pearson']:.3f} | {r['spearman']:.3f} | "
                     f"{r['median_query_pearson']:.3f} | {r['seconds']:.2f} |")
    lines += ["", f"Removing {REMOVE} training examples per test image, chosen as its top proponents (or at "
              "random), then refitting: how much the test image's loss rises (mean and median over the test images), "
              "and for how many of them the predicted label changes.", "",
              "| chosen by | mean loss rise | median loss rise | predictions changed |", "|---|---|---|---|"]
    for r in removal:
        lines.append(f"| {r['chooser']} | {r['mean_rise']:.4f} | {r['median_rise']:.4f} | "
                     f"{r['flips']} of {info['n_queries']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    t = time.perf_counter()
    rows, removal, info = faithfulness()
    OUT.write_text(report(rows, removal, info, time.perf_counter() - t))
    print(OUT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
