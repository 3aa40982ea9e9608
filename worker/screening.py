"""Screening in an evaluation (``sensitivity.screen``, ``worker.cadence``): checked against the exact slice, then
used on the screen's own rotation of the examples, its scores mapped onto the exact pass's scale.

Each evaluation screens its exact slice too and measures Spearman's ρ between the two rankings (metric
``screen_spearman``). Only where ρ reaches ``diagnostics.screen_min_spearman`` are the screened examples written, as
records marked ``screened``; their scores, LOO losses and probabilities are mapped by quantiles of the slice (the
screen leaves out the rest of the network's share of V, so its values run lower; the map keeps its order and puts
it on the slice's scale, so one ranking compares exact and screened examples).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr

from sensitivity.result import SensitivityResult
from sensitivity.screen import layer_variance, output_layer, screen
from worker.data import Rows

FORWARD_CHUNK = 128  # examples per forward: small batches keep a CPU's caches warm (bench/overhead.py)


@dataclass
class Screened:
    """What an evaluation adds: the screened examples' rows (empty when the check failed or none were due)."""

    metrics: dict[str, float] = field(default_factory=dict)
    idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loo_losses: np.ndarray = field(default_factory=lambda: np.zeros(0))
    prob_label: np.ndarray | None = None
    class_probs: np.ndarray | None = None
    seconds: float = 0.0
    count: int = 0  # examples screened, the check's included (what the cost is per)
    agrees: bool = False


    def rows(self, res: SensitivityResult) -> dict:
        """``write_evaluation``'s per-example arguments: the exact slice's rows, then the screened ones, marked."""
        k, n = len(self.idx), len(res.indices)

        def cat(exact, mine):
            return exact if exact is None or not k else None if mine is None else np.concatenate([exact, mine])

        probs = None if res.loo_probs is None else res.loo_probs.numpy()
        cls = None if res.loo_probs is None else res.loo_class_probs().numpy()
        return {"idx": cat(res.indices.numpy(), self.idx), "scores": cat(res.scores.numpy(), self.scores),
                "loo_losses": cat(res.loo_losses.numpy(), self.loo_losses), "prob_label": cat(probs, self.prob_label),
                "class_probs": cat(cls, self.class_probs), "screened": np.arange(n + k) >= n if k else None}


def available(model, variance) -> str | None:
    """Why screening cannot run for this model and Σ (None: it can)."""
    try:
        name, _ = output_layer(model)
    except ValueError as err:
        return str(err)
    if layer_variance(model, variance, name) is None:
        return "screening needs a diagonal variance"
    return None


def to_scale(values: np.ndarray, screened: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``values`` of the screen, mapped monotonically onto the exact pass's: the quantiles of the slice's screened
    values go to the same quantiles of its exact ones; beyond the slice's range, in proportion to its end."""
    ok = np.isfinite(screened) & np.isfinite(exact)
    a, b = np.sort(screened[ok]), np.sort(exact[ok])
    out = np.asarray(values, dtype=np.float64).copy()
    if len(a) < 2:
        return out
    fin = np.isfinite(out)
    v = out[fin]
    mapped = np.interp(v, a, b)
    hi, lo = v > a[-1], v < a[0]
    if a[-1] > 0:
        mapped[hi] = b[-1] * v[hi] / a[-1]
    if a[0] > 0:
        mapped[lo] = b[0] * v[lo] / a[0]
    out[fin] = mapped
    return out


def run(model, data, variance, form: str, res: SensitivityResult, sweep: torch.Tensor, *, min_spearman: float,
        chunk: int, max_amplification) -> Screened:
    """Screen ``res``'s examples (the check) and, where it agrees, ``sweep``'s examples not among them."""
    t = time.perf_counter()

    def scr(ids: torch.Tensor) -> SensitivityResult:
        return screen(model, Rows(data.xtr, data.ytr, ids, FORWARD_CHUNK), variance, form=form, chunk_size=chunk,
                      max_amplification=max_amplification)

    check = scr(res.indices)
    exact, mine = res.scores.double().numpy(), check.scores.double().numpy()
    ok = np.isfinite(exact) & np.isfinite(mine)
    rho = float(spearmanr(mine[ok], exact[ok]).statistic) if ok.sum() > 2 else float("nan")
    out = Screened(metrics={"screen_spearman": rho if np.isfinite(rho) else -1.0}, count=len(check.indices))
    out.agrees = bool(np.isfinite(rho) and rho >= min_spearman)
    rest = sweep[~torch.isin(sweep, res.indices)] if len(sweep) else sweep
    if out.agrees and len(rest):
        got = scr(rest)
        out.count += len(got.indices)
        out.idx = got.indices.numpy()
        out.scores = to_scale(got.scores.double().numpy(), mine, exact)
        out.loo_losses = to_scale(got.loo_losses.double().numpy(), check.loo_losses.double().numpy(),
                                  res.loo_losses.double().numpy())
        if got.loo_probs is not None and res.loo_probs is not None:
            # a probability falls as the loss rises: mapped through the negated values
            out.prob_label = -to_scale(-got.loo_probs.double().numpy(), -check.loo_probs.double().numpy(),
                                       -res.loo_probs.double().numpy())
            out.class_probs = got.loo_class_probs().numpy()
    out.metrics["screened"] = float(len(out.idx))
    out.seconds = time.perf_counter() - t
    return out
