"""The LOO estimate from a sample of the examples: stratified permutations, the take-all stratum of the largest
training losses, and the estimate's standard error (``worker.cadence`` plans which examples an evaluation scores;
this module says what their LOO losses tell about all of them)."""

from __future__ import annotations

import math

import numpy as np


def stratified_permutation(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..n-1 in an order whose every prefix holds the classes in proportion (±1 per class)."""
    labels = np.asarray(labels)
    keys = np.empty(len(labels))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keys[members] = (rng.permutation(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


def loo_estimate(losses: np.ndarray, labels: np.ndarray, population: np.ndarray,
                 control: tuple[np.ndarray, np.ndarray] | None = None,
                 certain: np.ndarray | None = None) -> tuple[float, float]:
    """(mean, standard error) of the population's mean LOO loss from a sample's LOO losses.

    ``population``: the number of examples of each class in the whole set (by label); with the finite-population
    correction, a full pass has error 0. ``control``: an auxiliary value of the sampled examples and of the whole
    population, known for all of them (each example's latest training loss, or the screen's LOO loss where it
    covered every example: ``worker.screening.Screened.control``): the regression estimator
    ȳ + b (X̄ − x̄) then carries the part of the spread the auxiliary explains (most of it: a mislabeled example's
    training and LOO losses are both large). ``certain``: which sampled examples belong to a take-all stratum
    (scored at every evaluation: the largest training losses, ``take_all``), counted exactly; ``control``'s second
    part then covers the population outside it. Otherwise, the classes are the strata, weighted by their share
    (the simple random sample's formulas when a sampled class has fewer than two examples). A non-finite loss makes
    both non-finite (the trainer fails the job on it).
    """
    losses, labels = np.asarray(losses, np.float64), np.asarray(labels)
    if certain is not None and np.any(certain):  # the take-all stratum counted exactly, the rest estimated
        c = np.asarray(certain, bool)
        rest = population - np.bincount(labels[c], minlength=len(population))
        m, se = loo_estimate(losses[~c], labels[~c], rest, None if control is None else (control[0][~c], control[1]))
        n_rest, total = int(rest.sum()), int(population.sum())
        if n_rest == 0:
            return float(losses[c].sum() / total), 0.0
        return float((losses[c].sum() + n_rest * m) / total), float(n_rest / total * se)
    n, total = len(losses), int(population.sum())
    if n == 0:
        return float("nan"), float("nan")
    if n >= total:
        return float(losses.mean()), 0.0
    fpc = 1 - n / total
    if control is not None and n > 2:
        x, everyone = (np.asarray(c, np.float64) for c in control)
        if np.isfinite(x).all() and np.isfinite(everyone).all() and x.var() > 0:
            b = np.cov(x, losses, ddof=1)[0, 1] / x.var(ddof=1)
            mean = losses.mean() + b * (everyone.mean() - x.mean())
            return float(mean), _jackknife_se(losses, x, float(everyone.mean())) * math.sqrt(fpc)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2 or np.any(population[classes] < counts):
        return float(losses.mean()), float(math.sqrt(losses.var(ddof=1) * fpc / n)) if n > 1 else float("nan")
    mean, var = 0.0, 0.0
    weights = population[classes] / population[classes].sum()
    for c, w, nh in zip(classes, weights, counts):
        part = losses[labels == c]
        big = population[c]
        mean += w * part.mean()
        var += w * w * part.var(ddof=1) / nh * (1 - nh / big)
    return float(mean), float(math.sqrt(max(var, 0.0)))


TAKE_ALL = 0.25  # of a sampled evaluation's examples: the largest latest training losses, scored every time


def take_all(control: np.ndarray | None, size: int) -> np.ndarray:
    """Positions of the take-all stratum: the ``TAKE_ALL`` share of ``size`` with the largest ``control`` values
    (each example's latest training loss). LOO losses are heavy-tailed and their tail follows the training loss:
    scoring it every time, exactly, leaves the sample the lighter rest (research/sample_se.py). Empty while some
    example has no training loss yet."""
    k = int(TAKE_ALL * size)
    if control is None or k == 0 or size >= len(control) or not np.isfinite(control).all():
        return np.empty(0, np.int64)
    return np.sort(np.argpartition(-control, k - 1)[:k])


def _jackknife_se(y: np.ndarray, x: np.ndarray, population_mean: float) -> float:
    """The regression estimator's jackknife standard error (each example left out of the sample in turn, closed
    form). LOO losses are heavy-tailed: the residual formula under-covers where a few large losses steer the slope
    (research/sample_se.py)."""
    n = len(y)
    m = n - 1
    mx, my = (x.sum() - x) / m, (y.sum() - y) / m
    vx = ((x * x).sum() - x * x) / m - mx * mx
    cxy = ((x * y).sum() - x * y) / m - mx * my
    slope = np.divide(cxy, vx, out=np.zeros(n), where=vx > 1e-300)
    theta = my + slope * (population_mean - mx)
    return float(math.sqrt(m / n * ((theta - theta.mean()) ** 2).sum()))


def blend(old: float | None, new: float, weight: float = 0.5) -> float:
    """A running average of measured costs: recent measurements weigh most (a machine's speed drifts)."""
    return new if old is None else (1 - weight) * old + weight * new


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ (ties at their average rank; NaN under three pairs or where one side is constant). Here rather
    than scipy's: importing scipy.stats costs a training process tens of MiB it holds to the end (bench/memory.py)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman: a and b must be 1-D and of one length, got shapes {a.shape} and {b.shape}")
    if len(a) < 3:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    out = np.empty(len(x))
    out[order] = ((starts + ends - 1) / 2.0)[np.cumsum(first) - 1]
    return out
