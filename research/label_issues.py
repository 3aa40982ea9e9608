"""cleanlab fed the LOO's class probabilities from one IVON run, against cleanlab fed 5-fold cross-validation (five
trainings of the same model) and fed the same run's in-sample probabilities, on digits with flipped labels.
Writes docs/label-issues.md:

    python -m research.label_issues
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from cleanlab.dataset import health_summary
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from research.experiments import _timed_train
from research.setups import Split, digits, flip_labels
from sensitivity import SensitivityResult, compute_sensitivities, ivon_variance
from sensitivity.calibration import fit_scale, rescale
from worker.calibration import heldout_nll
from worker.integrations.label_issues import pred_probs
from worker.sampling import stratified_permutation

SETTINGS = ((0.1, "uniform"), (0.3, "uniform"), (0.1, "pairs"))
EVALS = 10  # evaluations over a run, for the averaged probabilities
OUT = Path(__file__).parents[1] / "docs" / "label-issues.md"


def _normalized(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return p / p.sum(1, keepdims=True)


def compare(fraction: float, mode: str, epochs: int = 150, seed: int = 0, weight_decay: float = 1e-4) -> list[dict]:
    """One setting: each source of ``pred_probs`` through the same cleanlab calls, with its cost in training runs."""
    split = flip_labels(digits(seed=seed), fraction, mode, seed)
    history: list[tuple[SensitivityResult, float]] = []  # per evaluation: the result, seconds

    def evaluate(epoch, model, opt, _):
        if epoch % max(1, epochs // EVALS) == 0:  # as the worker evaluates: every few epochs and at the end
            t = time.perf_counter()
            r = compute_sensitivities(model, (split.xtr, split.ytr), ivon_variance(opt, model))
            history.append((r, time.perf_counter() - t))

    model, opt, train_s = _timed_train("mlp", "ivon", split, epochs, seed, weight_decay, evaluate)
    pass_s = min(h[1] for h in history)  # at the fastest pass, as the epochs
    res = compute_sensitivities(model, (split.xtr, split.ytr), ivon_variance(opt, model))
    _, all_labels, loo = pred_probs(res)
    cv, cv_s = np.zeros_like(loo), 0.0
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(split.xtr, split.ytr):
        m, _, fold_s = _timed_train("mlp", "ivon", Split(split.xtr[tr], split.ytr[tr], split.xte, split.yte),
                                    epochs, seed, weight_decay)
        cv_s += fold_s
        with torch.no_grad():
            m.eval()
            cv[te] = m(split.xtr[te]).softmax(-1).double().numpy()
    # the job's default: train on all but a stratified 5% held out, read the LOO at the scale whose LOO matches the
    # held-out NLL (worker.calibration's refit), at each evaluation
    held = np.sort(stratified_permutation(split.ytr.numpy(), np.random.default_rng(seed + 4))[:int(0.05 * split.n)])
    kept = torch.from_numpy(np.setdiff1d(np.arange(split.n), held))
    sub = Split(split.xtr[kept], split.ytr[kept], split.xte, split.yte, split.flipped[kept])
    calibrated: list[SensitivityResult] = []  # in the first-order form, as a calibrated job scores
    rayleigh: list[SensitivityResult] = []  # the uncalibrated default's form, calibrated alike

    def evaluate_calibrated(epoch, model, opt, _):
        if epoch % max(1, epochs // EVALS) == 0:
            nll, _ = heldout_nll(model, split.xtr, split.ytr, torch.from_numpy(held))
            for form, into in (("first_order", calibrated), ("rayleigh", rayleigh)):
                r = compute_sensitivities(model, (sub.xtr, sub.ytr), ivon_variance(opt, model), form=form)
                into.append(rescale(r, fit_scale(r, nll)[0]))

    _, _, cal_s = _timed_train("mlp", "ivon", sub, epochs, seed, weight_decay, evaluate_calibrated)
    sub_labels, sub_flipped = sub.ytr.numpy(), sub.flipped.numpy()
    sources = {
        "LOO class probabilities, calibrated on a 5% split (one IVON run on the rest)": (
            pred_probs(calibrated[-1])[2], cal_s + pass_s, sub_labels, sub_flipped),
        f"LOO class probabilities, calibrated, averaged over {len(calibrated)} evaluations": (
            pred_probs(calibrated)[2], cal_s + len(calibrated) * pass_s, sub_labels, sub_flipped),
        "the same, one run, the Rayleigh form": (pred_probs(rayleigh[-1])[2], cal_s + pass_s, sub_labels,
                                                 sub_flipped),
        f"the same, averaged over {len(rayleigh)} evaluations, the Rayleigh form": (
            pred_probs(rayleigh)[2], cal_s + len(rayleigh) * pass_s, sub_labels, sub_flipped),
        "LOO class probabilities, one IVON run": (loo, train_s + pass_s),
        "5-fold cross-validation, five IVON runs": (_normalized(cv), cv_s),
        "in-sample probabilities, one IVON run": (_normalized(res.logits.softmax(-1).numpy()), train_s),
        f"LOO class probabilities averaged over {len(history)} evaluations": (
            pred_probs([h[0] for h in history])[2], train_s + len(history) * pass_s),
        f"in-sample probabilities averaged over {len(history)} evaluations": (
            _normalized(np.mean([h[0].logits.softmax(-1).numpy() for h in history], 0)),
            train_s + len(history) * pass_s),
    }
    rows = []
    for name, (probs, cost_s, *own) in sources.items():
        labels, flipped = own if own else (all_labels, split.flipped.numpy())
        quality = get_label_quality_scores(labels, probs)
        issues = np.zeros(len(labels), dtype=bool)
        issues[find_label_issues(labels, probs)] = True
        health = health_summary(labels, probs, verbose=False)["overall_label_health_score"]
        rows.append({"fraction": fraction, "mode": mode, "source": name, "n": len(labels),
                     "auroc": float(roc_auc_score(flipped, -quality)),
                     "precision": float(flipped[issues].mean()) if issues.any() else float("nan"),
                     "recall": float(issues[flipped].mean()), "flagged": int(issues.sum()),
                     "health": float(health), "cost": cost_s / train_s})
    return rows


def report(rows: list[dict], seconds: float) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Label issues: cleanlab on the LOO's class probabilities", "",
        f"Generated by `python -m research.label_issues` on {when} ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, {seconds:.0f} s); do not edit by hand.", "",
        f"sklearn's digits ({max(r['n'] for r in rows):,} training images, 10 classes), a fraction of the training "
        "labels flipped (uniformly to another class, or within fixed class pairs), an MLP trained with IVON for 150 "
        "epochs. Each source of `pred_probs` goes through the same cleanlab calls: "
        "`rank.get_label_quality_scores` (AUROC of finding the flipped labels), `filter.find_label_issues` "
        "(precision and recall of the examples it flags) and `dataset.health_summary` (its overall label health "
        "score; the truth is 1 − the flipped fraction). Cost: in units of one training run (the LOO adds one "
        "sensitivity pass to the run, the averages one per evaluation). The calibrated rows are a job's default: "
        "5% of the training set held out (its labels flipped alike), the LOO read at the scale on σ² whose LOO "
        "matches their NLL at each evaluation (`worker.calibration`, docs/calibration.md); they are scored on "
        "the other 95%, in the first-order form a calibrated job scores in (the rows \"the same, ..., the Rayleigh "
        "form\": the same run's Rayleigh pass, calibrated alike; cost counted at the Rayleigh pass's time).", "",
        "| flipped | source | AUROC | precision | recall | flagged | health (truth) | cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['fraction']:.0%} {r['mode']} | {r['source']} | {r['auroc']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['flagged']} | {r['health']:.3f} ({1 - r['fraction']:.2f}) | "
                     f"{r['cost']:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> int:
    t = time.perf_counter()
    rows = [r for fraction, mode in SETTINGS for r in compare(fraction, mode)]
    OUT.write_text(report(rows, time.perf_counter() - t))
    print(OUT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
