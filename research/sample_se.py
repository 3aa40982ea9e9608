"""How often the sampled LOO's standard error covers the full pass, on real per-example losses.

A job scores a stratified slice of the training set per evaluation and reports the regression estimator (each
example's training loss as control variate) with a standard error (``worker.sampling.loo_estimate``). Here: IVON
MLPs on digits (clean, 10% and 30% of labels flipped), the LOO losses of every example at the end of training, and
a training-like loss at one posterior sample as the control; 2,000 slices per size, each scored as a job would.
Printed: the share of slices whose estimate lies within 1.96 standard errors of the full pass (nominal 0.95) and
the root-mean-square error relative to the full pass: for the residual formula the product used before, the
jackknife, and the jackknife with the take-all stratum (``worker.sampling.take_all``: a quarter of the slice spent on
the largest training losses, counted exactly) as a job now samples.

    python -m research.sample_se      (about two minutes on 2 CPUs)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from research.setups import digits, flip_labels, train
from sensitivity import compute_sensitivities, ivon_variance
from worker.sampling import loo_estimate, stratified_permutation, take_all


def _losses(seed: int, flip: float, epochs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    split = digits(seed=seed)
    if flip:
        split = flip_labels(split, flip, "uniform", seed)
    model, opt, _ = train("mlp", "ivon", split, epochs, seed, weight_decay=1e-3)
    res = compute_sensitivities(model, (split.xtr, split.ytr), ivon_variance(opt, model))
    loo = res.loo_losses.double().numpy()[np.argsort(res.indices.numpy())]
    with opt.sampled_params(), torch.no_grad():  # what a training step sees: a posterior sample
        control = torch.nn.functional.cross_entropy(model(split.xtr), split.ytr, reduction="none").double().numpy()
    return loo, control, split.ytr.numpy()


def _residual_se(y: np.ndarray, x: np.ndarray, fpc: float) -> float:
    b = np.cov(x, y, ddof=1)[0, 1] / x.var(ddof=1)
    r = y - y.mean() - b * (x - x.mean())
    return math.sqrt(r.var(ddof=2) * fpc / len(y))


def main() -> None:
    for seed, flip, epochs in ((1, 0.0, 40), (0, 0.1, 40), (2, 0.3, 60)):
        loo, control, labels = _losses(seed, flip, epochs)
        full, pop, rng = loo.mean(), np.bincount(labels), np.random.default_rng(0)
        for n in (64, 256):
            top = take_all(control, n)
            rest = np.setdiff1d(np.arange(len(loo)), top)
            inside, errors = {"residual": 0, "jackknife": 0, "take-all": 0}, {"jackknife": [], "take-all": []}
            for _ in range(2000):
                s = stratified_permutation(labels, rng)[:n]
                est, se = loo_estimate(loo[s], labels[s], pop, control=(control[s], control))
                inside["jackknife"] += abs(est - full) <= 1.96 * se
                errors["jackknife"].append((est - full) / full)
                inside["residual"] += abs(est - full) <= 1.96 * _residual_se(loo[s], control[s], 1 - n / len(loo))
                s = np.union1d(rest[stratified_permutation(labels[rest], rng)[: n - len(top)]], top)
                est, se = loo_estimate(loo[s], labels[s], pop, control=(control[s], control[rest]),
                                       certain=np.isin(s, top))
                inside["take-all"] += abs(est - full) <= 1.96 * se
                errors["take-all"].append((est - full) / full)
            rms = {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in errors.items()}
            print(f"digits, {flip:.0%} flipped, slice of {n} of {len(loo)}: within 1.96 SE of the full pass: "
                  f"residual formula {inside['residual'] / 2000:.3f}, jackknife {inside['jackknife'] / 2000:.3f}, "
                  f"with take-all {inside['take-all'] / 2000:.3f}; rms error {rms['jackknife']:.1%} -> "
                  f"{rms['take-all']:.1%}", flush=True)

if __name__ == "__main__":
    main()
