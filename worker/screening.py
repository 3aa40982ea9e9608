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

from sensitivity.result import SensitivityResult
from sensitivity.screen import layer_variance, output_layer, screen
from worker import distributed as D
from worker.data import Rows
from worker.sampling import spearman

FORWARD_CHUNK = 128  # examples per forward: small batches keep a CPU's caches warm (bench/overhead.py)


@dataclass
class Screened:
    """What an evaluation adds: the screened examples (none when the check failed or none were due), their values as
    the screen gave them; ``rows`` maps them onto the exact result's scale (after its calibration)."""

    metrics: dict[str, float] = field(default_factory=dict)
    idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seconds: float = 0.0
    count: int = 0  # examples screened, the check's included (what the cost is per)
    agrees: bool = False
    check: dict[str, np.ndarray] | None = None  # the slice's screened values, in the order of its exact result
    got: dict[str, np.ndarray] | None = None  # the sweep's

    def control(self, sample: np.ndarray, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The screen's LOO losses of the ``sample`` (the exact slice's indices, in order) and of every example of
        ``rest`` (the population the sample estimates), where it screened all of them (a final sweep that agreed), as
        ``worker.sampling.loo_estimate``'s control: it ranks like the exact pass, so it carries most of the sample's
        spread; else None."""
        if self.check is None or self.got is None or not self.agrees:
            return None
        idx = np.concatenate([self.check["idx"], self.got["idx"]])
        loo = np.concatenate([self.check["loo_losses"], self.got["loo_losses"]])
        by = np.argsort(idx, kind="stable")
        idx, loo = idx[by], loo[by]
        at = np.searchsorted(idx, rest).clip(max=len(idx) - 1)
        if not np.array_equal(idx[at], rest) or not np.array_equal(self.check["idx"], sample):
            return None
        return self.check["loo_losses"], loo[at]

    def rows(self, res: SensitivityResult) -> dict:
        """``write_evaluation``'s per-example arguments: the exact slice's rows, then the screened ones, marked."""
        k, n = len(self.idx), len(res.indices)
        probs = None if res.loo_probs is None else res.loo_probs.numpy()
        cls = None if res.loo_probs is None else res.loo_class_probs().numpy()
        out = {"idx": res.indices.numpy(), "scores": res.scores.numpy(), "loo_losses": res.loo_losses.numpy(),
               "prob_label": probs, "class_probs": cls, "screened": None}
        if not k:
            return out
        c, g = self.check, self.got
        mine = {"idx": self.idx, "scores": to_scale(g["scores"], c["scores"], res.scores.double().numpy()),
                "loo_losses": to_scale(g["loo_losses"], c["loo_losses"], res.loo_losses.double().numpy()),
                "prob_label": None, "class_probs": g.get("class_probs")}
        if probs is not None and "loo_probs" in g:
            # a probability falls as the loss rises: mapped through the negated values
            mine["prob_label"] = -to_scale(-g["loo_probs"], -c["loo_probs"], -res.loo_probs.double().numpy())
        for key in ("idx", "scores", "loo_losses", "prob_label", "class_probs"):
            out[key] = None if out[key] is None or mine[key] is None else np.concatenate([out[key], mine[key]])
        out["screened"] = np.arange(n + k) >= n
        return out


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


def _values(model, data, variance, form: str, ids: torch.Tensor, chunk: int, max_amplification) -> dict:
    """The screen's values for ``ids`` (this rank's share; empty: nothing to screen), by example index."""
    if not len(ids):
        return {"idx": np.zeros(0, np.int64)}
    r = screen(model, Rows(data.xtr, data.ytr, ids, FORWARD_CHUNK), variance, form=form, chunk_size=chunk,
               max_amplification=max_amplification)
    out = {"idx": r.indices.numpy(), "scores": r.scores.double().numpy(), "loo_losses": r.loo_losses.double().numpy()}
    if r.loo_probs is not None:
        out.update(loo_probs=r.loo_probs.double().numpy(), class_probs=r.loo_class_probs().numpy())
    return out


def _joined(parts: list[dict], order: np.ndarray | None = None) -> dict | None:
    """The ranks' values in one, ordered as ``order`` (example indices: each must be there) or by index."""
    parts = [p for p in parts if len(p["idx"])]
    if not parts:
        return None
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    by = np.argsort(out["idx"], kind="stable")
    if order is not None:
        by = by[np.searchsorted(out["idx"], order, sorter=by)]
        if not np.array_equal(out["idx"][by], order):
            raise RuntimeError("the screen's check did not cover its exact slice")
    return {k: v[by] for k, v in out.items()}


def run(model, data, variance, form: str, ids: torch.Tensor, exact: SensitivityResult | None, sweep, *,
        min_spearman: float, chunk: int, max_amplification) -> Screened | None:
    """Screen the exact slice (the check) and, where it agrees, ``sweep``'s examples not among them. Every rank calls
    it (under torchrun each screens its share: ``ids``, the rank's share of the slice, and every world-th of the
    sweep); rank 0 passes the gathered ``exact`` result and the ``sweep`` and gets the ``Screened``, the others
    None."""
    t = time.perf_counter()
    parts = D.gather(_values(model, data, variance, form, ids, chunk, max_amplification))
    out, todo = None, None
    if parts is not None:
        check = _joined(parts, exact.indices.numpy())
        ref, mine = exact.scores.double().numpy(), check["scores"] if check else np.zeros(0)
        ok = np.isfinite(ref) & np.isfinite(mine)
        rho = spearman(mine[ok], ref[ok])
        out = Screened(metrics={"screen_spearman": rho if np.isfinite(rho) else -1.0}, count=len(exact.indices),
                       agrees=bool(np.isfinite(rho) and rho >= min_spearman), check=check)
        todo = sweep[~torch.isin(sweep, exact.indices)] if out.agrees and len(sweep) else sweep[:0]
    todo = D.broadcast(todo)
    if len(todo):
        parts = D.gather(_values(model, data, variance, form, D.shard(todo), chunk, max_amplification))
        if out is not None:
            out.got = _joined(parts)
            out.idx = out.got["idx"]
            out.count += len(out.idx)
    if out is None:
        return None
    out.metrics["screened"] = float(len(out.idx))
    out.seconds = time.perf_counter() - t
    return out
