"""Calibrating the LOO estimate's level (sensitivity.calibration): candidates measured against held-out truth.

    python -m research.calibration [--quick] [--out docs/calibration.md]

Each setting trains IVON (matched β2) on a training set less a stratified calibration split (5%, at most 2,000),
evaluates every epoch at the posterior mean: the LOO on a fixed stratified sample of the training set (rayleigh
form, σ² as trained), the NLL on the calibration split and on a large held-out test set (the truth). The
candidates differ only in the scale α on σ² the LOO is read at (no retraining between them):
  raw        α = 1 (uncalibrated: calibration.source none)
  refit      α refitted at every evaluation so that the LOO equals the calibration split's NLL
  frozen     α fitted at the evaluations in the first 20% of the run (geometric mean), then fixed
  frozen_σ²  frozen, and divided by the growth of σ²'s geometric mean since then: σ² grows by schedule
             (hess_init's remainder decays under the matched β2), so this freezes the level of αΣ instead
(the job config's calibration.mode refit, frozen and frozen_variance, read through worker.calibration itself)
  refit_prob α refitted at every evaluation so that the LOO's mean probability of the label equals the split's
             (a bounded target, so a small split's few confident mistakes would not set the level; research only:
             measured against the others, not a product mode)
  ..., first order  the same mode on the first-order pass (one first-order pass instead of Rayleigh's two: what a
             calibrated job scores with, worker.calibration.Calibration.form)
Scores: level (final LOO / final test NLL), trend (Spearman over evaluations with the test NLL), stopping (test NLL
where early stopping on the LOO restores, over the best evaluation's), transfer (the last scale of another run,
another seed, weight decay or run length, used as a fixed ``calibration.scale``). A small setting compares
per-example LOO losses with leave-one-out retraining. Each run also reports its calibration split's sampling error
(``split_noise``: how often a split of its size, drawn from the run's test set, puts refit's level outside the goal).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from app.store.job_config import CalibrationConfig
from ivon_core import IVON, matched_beta2
from research.calibration_data import stratified, synthetic, textures
from research.setups import Split
from sensitivity import compute_sensitivities, ivon_variance
from sensitivity.calibration import fit_scale, rescale
from worker.calibration import Calibration
from worker.models import mlp, small_cnn
from worker.step import train_step

FREEZE_AT = 0.2  # frozen candidates: α from the evaluations in this share of the run
SAMPLE = 2000  # training examples the LOO is estimated on (the worker's budgeted sample is of this order)
SPLIT, SPLIT_MAX = 0.05, 2000


def _nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return _heldout(model, x, y)[0]


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([nn.functional.cross_entropy(model(c), t, reduction="none") for c, t in
                          zip(x.split(1024), y.split(1024))]).double()


def _heldout(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(NLL, mean probability of the label) of the model's predictions on (x, y)."""
    out = _losses(model, x, y)
    return float(out.mean()), float(torch.exp(-out).mean())


def split_noise(losses: np.ndarray, labels: np.ndarray, n: int, draws: int = 2000, seed: int = 0) -> dict:
    """How far a class-stratified split of ``n`` examples puts its NLL from a larger held-out set's: the split's
    NLL / the set's over ``draws`` splits drawn from the set's own per-example losses (what refit's level inherits,
    the model held fixed). ``sd``: its standard deviation; ``miss``: the share of draws outside 0.75–1.25."""
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    takes = [max(1, round(n * len(c) / len(labels))) for c in classes]
    ratios = np.array([np.concatenate([losses[rng.choice(c, k, replace=False)] for c, k in zip(classes, takes)])
                       .mean() for _ in range(draws)]) / losses.mean()
    return {"sd": float(ratios.std()), "miss": float(((ratios < 0.75) | (ratios > 1.25)).mean())}


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.cat([model(c).argmax(1) for c in x.split(1024)]).eq(y).double().mean())


def run(split: Split, make_model, epochs: int, hess_init: float, weight_decay: float, seed: int,
        batch: int = 128, lr: float = 0.5) -> dict:
    """One IVON run; per evaluation the LOO sample's SensitivityResult (rescalable) and the held-out NLLs."""
    torch.manual_seed(seed)
    labels = split.ytr.numpy()
    cal = stratified(labels, min(SPLIT_MAX, max(1, int(SPLIT * len(labels)))), seed + 11)
    train = np.setdiff1d(np.arange(len(labels)), cal)
    sample = train[stratified(labels[train], SAMPLE, seed + 12)]
    xtr, ytr = split.xtr[train], split.ytr[train]
    model = make_model()
    steps = epochs * math.ceil(len(train) / batch)
    opt = IVON(model.parameters(), lr=lr, ess=len(train), hess_init=hess_init, weight_decay=weight_decay,
               beta2=matched_beta2(steps))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    evals, t_train, t_eval, t_cal = [], 0.0, 0.0, 0.0
    t_forms = {"rayleigh": 0.0, "first_order": 0.0}
    for ep in range(1, epochs + 1):
        t = time.perf_counter()
        for idx in torch.randperm(len(train), generator=gen).split(batch):
            train_step(model, opt, xtr[idx], ytr[idx])  # the product's step
            sched.step()
        t_train += time.perf_counter() - t
        t, first_before = time.perf_counter(), t_forms["first_order"]
        var = ivon_variance(opt, model)
        passes = {}
        for form in ("rayleigh", "first_order"):
            t_pass = time.perf_counter()
            passes[form] = compute_sensitivities(model, (split.xtr[sample], split.ytr[sample]), var, form=form)
            t_forms[form] += time.perf_counter() - t_pass
        res = passes["rayleigh"]
        sig = torch.cat([v.flatten() for v in var.values()])
        t_cal -= time.perf_counter()  # the calibration's own cost: the split's NLL here, the fit below
        cal_losses = _losses(model, split.xtr[cal], split.ytr[cal])
        cal_nll, cal_prob = float(cal_losses.mean()), float(torch.exp(-cal_losses).mean())
        t_cal += time.perf_counter()
        test_losses = _losses(model, split.xte, split.yte)
        evals.append({"epoch": ep, "res": res, "res_first": passes["first_order"], "cal_nll": cal_nll,
                      "cal_prob": cal_prob,
                      "cal_se": float(cal_losses.std() / math.sqrt(len(cal_losses))),
                      "test_nll": float(test_losses.mean()), "test_acc": _acc(model, split.xte, split.yte),
                      "sigma_level": float(sig[sig > 0].log().mean().exp()),
                      "share": opt.hess_init_share()})
        t_eval += time.perf_counter() - t - (t_forms["first_order"] - first_before)
    for e in evals:
        t = time.perf_counter()
        e["alpha_fit"], e["reached"] = fit_scale(e["res"], e["cal_nll"])
        t_cal += time.perf_counter() - t
        e["raw"] = e["res"].loo
    return {"evals": evals, "n_train": len(train), "n_cal": len(cal), "train_s": t_train, "eval_s": t_eval,
            "cal_s": t_cal, "split_noise": split_noise(test_losses.numpy(), split.yte.numpy(), len(cal)),
            "pass_ratio": t_forms["first_order"] / t_forms["rayleigh"]}


def series(evals: list[dict], policy: str, scale: float | None = None) -> tuple[np.ndarray, float]:
    """(the LOO over evaluations, the last scale in use) under a policy, read through the product's own
    ``worker.calibration.Calibration`` (the fits against the calibration split's NLL); ``scale``: a fixed scale
    from another run (transfer, the job config's ``calibration.scale``)."""
    if policy.endswith(FIRST):
        policy, evals = policy[: -len(FIRST)], [{**e, "res": e["res_first"]} for e in evals]
    if policy == "raw":
        return np.array([e["raw"] for e in evals]), 1.0
    if policy == "refit_prob":
        out, alpha = [], 1.0
        for e in evals:
            alpha = scale if scale is not None else fit_scale(e["res"], -e["cal_prob"],
                                                              lambda v: -float(torch.exp(-v.double()).mean()))[0]
            out.append(float(rescale(e["res"], alpha).loo_losses.double().mean()))
        return np.array(out), alpha
    mode = {"frozen_σ²": "frozen_variance"}.get(policy, policy)
    cfg = CalibrationConfig(source="test", mode=mode if scale is None else "frozen", freeze_at=FREEZE_AT,
                            scale=scale)
    cal = Calibration(cfg, np.zeros(0, np.int64), evals[-1]["epoch"], seed=0)
    out = []
    for e in evals:
        res, m = cal.update(e["res"], lambda v: float(v.double().mean()), e["cal_nll"], e["epoch"],
                            e["sigma_level"])
        out.append(res.loo)
    return np.array(out), cal.last


FIRST = ", first order"
POLICIES = ("raw", "refit", "frozen", "frozen_σ²", "refit_prob", *(p + FIRST for p in ("refit", "frozen", "frozen_σ²")))


def stop_index(loo: np.ndarray, patience: int = 3) -> int:
    """Where early stopping on ``loo`` (min, patience, restore best) leaves the model."""
    best, wait = 0, 0
    for i in range(1, len(loo)):
        if loo[i] < loo[best]:
            best, wait = i, 0
        else:
            wait += 1
            if wait > patience:
                break
    return best


def score(loo: np.ndarray, evals: list[dict]) -> dict:
    test = np.array([e["test_nll"] for e in evals])
    stop = stop_index(loo)
    return {"level": float(loo[-1] / test[-1]), "trend": float(spearmanr(loo, test).statistic),
            "stopping": float(test[stop] / test.min()), "stop_epoch": evals[stop]["epoch"]}


def per_example(seed: int = 0) -> dict:
    """Digits, 300 examples, float64 tanh MLP: per-example LOO losses at several α against exact retraining."""
    from research.estimators import refine
    from research.setups import digits
    from sensitivity.covariance import prior_from_weight_decay
    from sensitivity.retrain import leave_one_out

    split = digits(300, seed, torch.float64)
    wd, epochs, batch = 3e-3, 100, 32
    torch.manual_seed(seed)
    model = mlp(64, 10, (32,), activation="tanh").double()  # the validation's 64-32-10 (exact batched refits)
    steps = epochs * math.ceil(split.n / batch)
    opt = IVON(model.parameters(), lr=0.5, ess=split.n, hess_init=0.3, weight_decay=wd, beta2=matched_beta2(steps))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(split.n, generator=gen).split(batch):
            train_step(model, opt, split.xtr[idx], split.ytr[idx])
    res = compute_sensitivities(model, (split.xtr, split.ytr), ivon_variance(opt, model))
    alpha, _ = fit_scale(res, _nll(model, split.xte, split.yte))
    base = refine(model, Split(split.xtr, split.ytr, split.xte, split.yte), wd, 1000, restarts=10)
    _, truth = leave_one_out(base, split.xtr, split.ytr, list(range(split.n)),
                             prior_precision=prior_from_weight_decay(wd, split.n))
    first = compute_sensitivities(model, (split.xtr, split.ytr), ivon_variance(opt, model), form="first_order")
    alpha_first, _ = fit_scale(first, _nll(model, split.xte, split.yte))
    out = {"alpha_test": alpha, "true_loo": float(truth.mean())}
    for name, a, r in (("raw", 1.0, res), ("alpha/10", alpha / 10, res), ("alpha", alpha, res),
                       ("alpha*10", alpha * 10, res), ("alpha, first order", alpha_first, first)):
        r = rescale(r, a)
        out[name] = {"rank": float(spearmanr(r.loo_losses.numpy(), truth.numpy()).statistic),
                     "ratio": float(r.loo_losses.mean() / truth.mean()), "scale": a}
    return out


SETTINGS = {  # name: (split, model, epochs, hess_init, weight decay, clean)
    "synthetic 20k, MLP 512-512, hess_init 0.03": (lambda s: synthetic(20000, 4000, s),
                                                   lambda: mlp(40, 10, (512, 512)), 30, 0.03, 1e-3, True),
    "synthetic 20k, MLP 512-512, hess_init 0.3": (lambda s: synthetic(20000, 4000, s),
                                                  lambda: mlp(40, 10, (512, 512)), 30, 0.3, 1e-3, True),
    "textures 12k images 16×16, CNN": (lambda s: textures(12000, 4000, s), lambda: small_cnn(1, 10, 16), 20, 0.3,
                                       1e-3, True),
    "synthetic 3k, 20% flipped (memorized), MLP 512-512": (lambda s: synthetic(3000, 4000, s, flips=0.2),
                                                           lambda: mlp(40, 10, (512, 512)), 60, 0.3, 1e-4, False),
}
SEEDS = {"textures 12k images 16×16, CNN": (0, 1, 2, 3)}  # the smallest split (600): its noise needs more runs
QUICK = {"synthetic 20k, MLP 512-512, hess_init 0.3": 8, "textures 12k images 16×16, CNN": 6}


def measure(quick: bool = False) -> dict:
    out: dict = {"settings": {}, "transfer": {}}
    for name, (make_split, make_model, epochs, hess_init, wd, clean) in SETTINGS.items():
        if quick and name not in QUICK:
            continue
        epochs = QUICK[name] if quick else epochs
        runs = {}
        for seed in SEEDS.get(name, (0, 1)) if not quick else (0, 1):
            t = time.perf_counter()
            runs[seed] = run(make_split(seed), make_model, epochs, hess_init, wd, seed)
            print(f"{name} seed {seed}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        rows = {}
        for seed, r in runs.items():
            ev = r["evals"]
            rows[seed] = {p: score(series(ev, p)[0], ev) for p in POLICIES}
            rows[seed]["meta"] = {"n_train": r["n_train"], "n_cal": r["n_cal"],
                                  "cost": r["eval_s"] / r["train_s"], "cal_cost": r["cal_s"] / r["train_s"],
                                  "pass_ratio": r["pass_ratio"],
                                  "alpha_frozen": series(ev, "frozen")[1],
                                  "alpha_first": ev[0]["alpha_fit"], "alpha_last": ev[-1]["alpha_fit"],
                                  "share": ev[-1]["share"], "test_acc": ev[-1]["test_acc"],
                                  "unreached": sum(not e["reached"] for e in ev),
                                  "test_nll": [e["test_nll"] for e in ev], "epoch": [e["epoch"] for e in ev],
                                  "cal_nll": [e["cal_nll"] for e in ev],
                                  "cal_se": ev[-1]["cal_se"], "split_noise": r["split_noise"],
                                  **{p: series(ev, p)[0].tolist() for p in POLICIES}}
        out["settings"][name] = {"clean": clean, "epochs": epochs, "hess_init": hess_init, "weight_decay": wd,
                                 "seeds": rows}
        print(report(out, 0, "partial"), file=sys.stderr, flush=True)
        # transfer across seeds: seed 0's scales read on seed 1's run as a fixed calibration.scale
        ev1 = runs[1]["evals"]
        out["transfer"][f"{name}: seed 0 → seed 1"] = {
            f"{p} scale of seed 0": score(series(ev1, p, series(runs[0]["evals"], p)[1])[0], ev1)
            for p in ("refit", "frozen")}
    if not quick:
        # transfer across weight decay and run length on the 20k setting
        make_split, make_model = SETTINGS["synthetic 20k, MLP 512-512, hess_init 0.3"][:2]
        base = run(make_split(0), make_model, 30, 0.3, 1e-3, 0)["evals"]
        for label, (epochs, wd) in {"weight decay 1e-3 → 1e-4": (30, 1e-4), "30 → 15 epochs": (15, 1e-3)}.items():
            other = run(make_split(0), make_model, epochs, 0.3, wd, 0)["evals"]
            out["transfer"][f"synthetic 20k: {label}"] = {
                f"{p} scale of the first": score(series(other, p, series(base, p)[1])[0], other)
                for p in ("refit", "frozen")}
        out["per_example"] = per_example()
    return out


def _f(x: float, nd: int = 2) -> str:
    return "nan" if x != x else f"{x:.{nd}f}"


def _split_ratio(meta: dict) -> str:
    if not meta.get("cal_nll"):
        return "nan"
    text = _f(meta["cal_nll"][-1] / meta["test_nll"][-1]) + " (what refit's level inherits"
    if "split_noise" in meta:
        noise = meta["split_noise"]
        text += (f"; the split's standard error {meta['cal_se'] / meta['cal_nll'][-1]:.0%} of its NLL; splits of its "
                 f"size drawn from the test set: sd {_f(noise['sd'])} of this ratio, outside 0.75–1.25 in "
                 f"{noise['miss']:.1%} of draws")
    return text + ")"


def report(res: dict, seconds: float, command: str) -> str:
    lines = ["# Calibrating the LOO estimate's level", "",
             f"Written by `{command}` in {seconds / 60:.1f} min on {platform.machine()} with "
             f"{torch.get_num_threads()} threads (torch {torch.__version__}); raw results in `calibration.json`. "
             "Method: `research/calibration.py`'s docstring; the scale is `sensitivity.calibration`.", "",
             "Goals: level (final LOO / final held-out NLL) within 0.75–1.25 and trend (Spearman with the held-out "
             "NLL over evaluations) ≥ 0.8 in every clean setting; stopping (held-out NLL where early stopping on "
             "the LOO restores / the best evaluation's) ≤ 1.10; under memorized flips the trend ≥ 0.8 too.", ""]
    lines += ["## Summary", "", "Over every setting and seed below (the flipped setting included):", "",
              "| candidate | runs passing | level range | lowest trend | worst stopping |", "|---|---|---|---|---|"]
    for p in POLICIES:
        rows = [m[p] for s in res["settings"].values() for m in s["seeds"].values()]
        ok = sum(0.75 <= r["level"] <= 1.25 and r["trend"] >= 0.8 and r["stopping"] <= 1.10 for r in rows)
        lines.append(f"| {p} | {ok} of {len(rows)} | {_f(min(r['level'] for r in rows))}–"
                     f"{_f(max(r['level'] for r in rows))} | {_f(min(r['trend'] for r in rows))} | "
                     f"{_f(max(r['stopping'] for r in rows), 3)} |")
    noise = [m["meta"]["split_noise"] for s in res["settings"].values() for m in s["seeds"].values()
             if "split_noise" in m["meta"]]
    if noise:
        lines += ["", "refit's level is the calibration split's NLL over the test set's: its only error is the split's "
                  "sampling error. Splits of each run's size, drawn from that run's test set (the model held fixed), "
                  f"put this ratio outside 0.75–1.25 in {min(x['miss'] for x in noise):.1%}–"
                  f"{max(x['miss'] for x in noise):.1%} of draws (sd {_f(min(x['sd'] for x in noise))}–"
                  f"{_f(max(x['sd'] for x in noise))}): the chance that a run misses the level goal by its split "
                  "alone."]
    lines.append("")
    for name, s in res["settings"].items():
        lines += [f"## {name}", "",
                  f"{s['epochs']} epochs, hess_init {s['hess_init']}, weight decay {s['weight_decay']}; "
                  + "; ".join(f"seed {k}: {m['meta']['n_train']} trained, {m['meta']['n_cal']} in the calibration "
                              f"split, test accuracy {_f(m['meta']['test_acc'], 3)}, hess_init share "
                              f"{_f(m['meta']['share'], 3)}, α fitted {_f(m['meta']['alpha_first'])} at the first "
                              f"evaluation, {_f(m['meta']['alpha_last'])} at the last, evaluation cost "
                              f"{_f(m['meta']['cost'])}× training, of which the calibration (the split's NLL and "
                              f"the fit) {m['meta']['cal_cost']:.3f}×, the first-order pass "
                              f"{_f(m['meta'].get('pass_ratio', float('nan')))}× the Rayleigh pass's time, the "
                              "split's final NLL / the test set's "
                              f"{_split_ratio(m['meta'])}"
                              for k, m in s["seeds"].items()), "",
                  "| candidate | seed | level | trend | stopping | verdict |", "|---|---|---|---|---|---|"]
        for p in POLICIES:
            for seed, m in s["seeds"].items():
                r = m[p]
                ok = 0.75 <= r["level"] <= 1.25 and r["trend"] >= 0.8 and r["stopping"] <= 1.10
                lines.append(f"| {p} | {seed} | {_f(r['level'])} | {_f(r['trend'])} | {_f(r['stopping'], 3)} | "
                             f"{'PASS' if ok else 'FAIL'} |")
        lines.append("")
    if res["transfer"]:
        lines += ["## Transfer: one run's last scale, read on another as a fixed calibration.scale", "",
                  "| transfer | candidate | level | trend | stopping |", "|---|---|---|---|---|"]
        for name, t in res["transfer"].items():
            for p, r in t.items():
                lines.append(f"| {name} | {p} | {_f(r['level'])} | {_f(r['trend'])} | {_f(r['stopping'], 3)} |")
        lines.append("")
    if "per_example" in res:
        pe = res["per_example"]
        lines += ["## Per-example fidelity against retraining", "",
                  "digits, 300 examples, float64 tanh MLP 64-32-10, weight decay 0.003, 100 epochs; truth: "
                  f"retraining without each example (true LOO {_f(pe['true_loo'], 3)}); α fitted on the 360 test "
                  f"examples: {_f(pe['alpha_test'])}.", "",
                  "| scale | per-example Spearman vs retraining | level vs true LOO |", "|---|---|---|"]
        for k in ("raw", "alpha/10", "alpha", "alpha*10", "alpha, first order"):
            lines.append(f"| {k} ({_f(pe[k]['scale'], 3)}) | {_f(pe[k]['rank'], 3)} | {_f(pe[k]['ratio'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two settings, a few epochs (a smoke run)")
    ap.add_argument("--out", default="docs/calibration.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t = time.perf_counter()
    res = measure(args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m research.calibration" + (" --quick" if args.quick else "")
    out.write_text(report(res, time.perf_counter() - t, command) + "\n")
    out.with_name("calibration.json").write_text(json.dumps(res, indent=1, default=float))
    print(out)


if __name__ == "__main__":
    main()
