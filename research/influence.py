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
from sensitivity import BlockCovariance, DenseCovariance, KFACCovariance, influence, sgd_variance
from sensitivity.retrain import fit_map

OUT = Path(__file__).parents[1] / "docs" / "influence.md"
PRIOR = 1.0
REMOVE = 10  # examples removed per query in the removal test
SEEDS = (0, 1, 2, 3, 4)


def _setup(n_train: int, n_queries: int, seed: int):
    split = digits(n_train=n_train, seed=seed, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    fit_map(model, split.xtr, split.ytr, prior_precision=PRIOR, polish=True)
    return model, split.xtr, split.ytr, split.xte[:n_queries]


def _losses(model: nn.Module, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(xq), yq, reduction="none")


def _refit_without(model, x, y, drop) -> nn.Module:
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[list(drop)] = False
    return fit_map(copy.deepcopy(model), x[keep], y[keep], prior_precision=PRIOR, polish=True)


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


COVARIANCES = {  # name → (covariance at the MAP, form, loss changes from the output changes or first order in them)
    "dense Laplace (exact GGN), corrected": (lambda m, d: DenseCovariance.laplace(m, d, prior_precision=PRIOR),
                                             "corrected", True),
    "dense Laplace, corrected, loss first order in Δf* (outputs=False)": (
        lambda m, d: DenseCovariance.laplace(m, d, prior_precision=PRIOR), "corrected", False),
    "dense Laplace, first order": (lambda m, d: DenseCovariance.laplace(m, d, prior_precision=PRIOR), "first_order",
                                   True),
    "K-FAC, first order (auto)": (lambda m, d: KFACCovariance.fit(m, d, prior_precision=PRIOR, mc_samples=None),
                                  "first_order", True),
    "K-FAC, corrected": (lambda m, d: KFACCovariance.fit(m, d, prior_precision=PRIOR, mc_samples=None), "corrected",
                         True),
    "diagonal body + dense last layer, first order (auto)": (
        lambda m, d: BlockCovariance.with_last_layer(m, sgd_variance(m, d, prior_precision=PRIOR).variances,
                                                     DenseCovariance.last_layer(m, d, prior_precision=PRIOR)),
        "first_order", True),
    "diagonal Laplace (what IVON's σ² estimates), first order (auto)": (
        lambda m, d: sgd_variance(m, d, prior_precision=PRIOR), "first_order", True),
    "diagonal Laplace, Rayleigh (the LOO's form)": (lambda m, d: sgd_variance(m, d, prior_precision=PRIOR),
                                                   "rayleigh", True),
}
DENSE = "dense Laplace (exact GGN), corrected"
DIAGONAL = "diagonal Laplace (what IVON's σ² estimates), first order (auto)"


def _instance(n_train: int, n_queries: int, seed: int) -> tuple[dict, dict, dict]:
    """One model instance: every covariance's Pearson/Spearman with retraining, and the removal test's rises."""
    model, x, y, xq = _setup(n_train, n_queries, seed)
    with torch.no_grad():
        yq = model(xq).argmax(1)  # the predicted labels, as a query without a label
    base = _losses(model, xq, yq)
    t = time.perf_counter()
    actual = torch.stack([_losses(_refit_without(model, x, y, [i]), xq, yq) - base for i in range(len(x))], 1)
    refit_s = time.perf_counter() - t
    stats, results = {}, {}
    for name, (make, form, outputs) in COVARIANCES.items():
        cov = make(model, (x, y))
        t = time.perf_counter()
        res = influence(model, xq, (x, y), cov, form=form, outputs=outputs)
        seconds = time.perf_counter() - t
        results[name] = res
        pred, true = res.loss_change.flatten().numpy(), actual.flatten().numpy()
        per_query = [pearsonr(res.loss_change[q].numpy(), actual[q].numpy())[0] for q in range(len(xq))]
        stats[name] = {"pearson": float(pearsonr(pred, true)[0]), "spearman": float(spearmanr(pred, true)[0]),
                       "median_query_pearson": float(np.median(per_query)), "seconds": seconds}
    tracin = _tracin(model, x, y, xq, yq)
    gen = torch.Generator().manual_seed(seed)
    choosers = {
        "influence, dense Laplace": lambda q: results[DENSE].proponents(q, REMOVE)[0],
        "influence, diagonal Laplace": lambda q: results[DIAGONAL].proponents(q, REMOVE)[0],
        "TracIn (final weights)": lambda q: torch.argsort(tracin[q], descending=True)[:REMOVE],
        "random": lambda q: torch.randperm(len(x), generator=gen)[:REMOVE],
    }
    removal = {}
    for name, choose in choosers.items():
        rises, flips = [], 0
        for q in range(len(xq)):
            refit = _refit_without(model, x, y, choose(q).tolist())
            rises.append(float(_losses(refit, xq[q : q + 1], yq[q : q + 1])[0] - base[q]))
            with torch.no_grad():
                flips += int(refit(xq[q : q + 1]).argmax(1)) != int(yq[q])
        removal[name] = {"rises": rises, "flips": flips}
    info = {"n_train": len(x), "params": sum(p.numel() for p in model.parameters()), "refit_s": refit_s}
    return stats, removal, info


def faithfulness(n_train: int = 150, n_queries: int = 10, seeds: tuple[int, ...] = SEEDS
                 ) -> tuple[list[dict], list[dict], dict]:
    runs = [_instance(n_train, n_queries, seed) for seed in seeds]
    rows = []
    for name in COVARIANCES:
        per = [r[0][name] for r in runs]
        pearson = [p["pearson"] for p in per]
        rows.append({"covariance": name, "pearson": float(np.median(pearson)), "pearson_min": min(pearson),
                     "pearson_max": max(pearson), "spearman": float(np.median([p["spearman"] for p in per])),
                     "median_query_pearson": float(np.median([p["median_query_pearson"] for p in per])),
                     "seconds": float(np.median([p["seconds"] for p in per]))})
    removal = []
    for name in runs[0][1]:
        rises = [v for r in runs for v in r[1][name]["rises"]]
        removal.append({"chooser": name, "mean_rise": float(np.mean(rises)), "median_rise": float(np.median(rises)),
                        "flips": sum(r[1][name]["flips"] for r in runs)})
    info = {**runs[0][2], "refit_s": sum(r[2]["refit_s"] for r in runs), "n_queries": n_queries,
            "seeds": len(seeds)}
    return rows, removal, info


def report(rows: list[dict], removal: list[dict], info: dict, seconds: float,
           command: str = "python -m research.influence") -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    queries = info["n_queries"] * info["seeds"]
    lines = [
        "# Influence queries against retraining", "",
        f"Generated by `{command}` on {when} ({platform.machine()}, {torch.get_num_threads()} "
        f"threads, {seconds:.0f} s); do not edit by hand. Exactness against a naive Jacobian reference for every form "
        "and covariance: `tests/test_influence.py`; speed: `python bench/influence.py`.", "",
        f"sklearn's digits, {info['n_train']} training images, an MLP 64-12-10 (tanh, {info['params']} parameters) "
        f"at its MAP (L-BFGS, prior precision {PRIOR:g}, then Newton steps to a gradient below 1e-8), float64, "
        f"{info['seeds']} instances (data subset and initialization by seed). For each of {info['n_queries']} test "
        "images per instance (at their predicted labels) and each training example: the predicted change of the "
        "test image's loss when the example is removed (`sensitivity.influence`), against the change after "
        f"refitting without it (warm-started, converged as the MAP is; {info['refit_s']:.0f} s for all refits). "
        "Pearson over all (test image, training example) pairs of an instance: the median over instances, and "
        "their range; \"(auto)\" marks the form `influence` picks for that covariance.", "",
        "| covariance, form | Pearson (median) | Pearson (range) | Spearman | median Pearson per test image | "
        "seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['covariance']} | {r['pearson']:.3f} | {r['pearson_min']:.3f}–{r['pearson_max']:.3f} | "
                     f"{r['spearman']:.3f} | {r['median_query_pearson']:.3f} | {r['seconds']:.2f} |")
    lines += ["", f"Removing {REMOVE} training examples per test image ({queries} test images), chosen as its top "
              "proponents (or at random), then refitting: how much the test image's loss rises (mean and median), "
              "and for how many of them the predicted label changes.", "",
              "| chosen by | mean loss rise | median loss rise | predictions changed |", "|---|---|---|---|"]
    for r in removal:
        lines.append(f"| {r['chooser']} | {r['mean_rise']:.4f} | {r['median_rise']:.4f} | {r['flips']} of {queries} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    t = time.perf_counter()
    rows, removal, info = faithfulness()
    OUT.write_text(report(rows, removal, info, time.perf_counter() - t))
    print(OUT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
