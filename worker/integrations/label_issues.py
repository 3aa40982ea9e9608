"""cleanlab on one training run: each example's LOO class probabilities are out-of-sample predictions, the
``pred_probs`` cleanlab's label-issue finders take (which it otherwise gets from K-fold cross-validation: K more
trainings). Averaged over a run's evaluations they rank flipped labels after training has memorized them, where the
last evaluation's no longer do; how they compare with cross-validation: docs/label-issues.md.

    results = []
    for epoch in range(epochs):
        train_one_epoch()
        results.append(compute_sensitivities(model, (x_train, y_train), ivon_variance(optimizer, model)))
    issues = find_label_issues(results)          # dataset indices, most likely mislabeled first
    summary = health_summary(results, class_names=names)

A stored run keeps the same average: ``GET /api/v1/runs/{id}/pred_probs.csv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sensitivity import SensitivityResult

Results = SensitivityResult | Sequence[SensitivityResult]  # one evaluation, or several to average


def pred_probs(results: Results) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, labels, pred_probs) ordered by example index: the LOO class probabilities of one evaluation, or
    averaged over several (each example over those that include it), as cleanlab takes them. Labels must be the
    class indices 0..K-1."""
    results = [results] if isinstance(results, SensitivityResult) else list(results)
    if not results:
        raise ValueError("no sensitivity results to take class probabilities from")
    for res in results:
        if res.targets.ndim != 1 or res.targets.is_floating_point() and not bool(
                (res.targets == res.targets.round()).all()):
            raise ValueError("cleanlab takes integer class labels; these targets are not")
    indices = np.unique(np.concatenate([r.indices.numpy() for r in results]))
    classes = results[0].logits.shape[1] if results[0].logits.shape[1] > 1 else 2
    total, count = np.zeros((len(indices), classes)), np.zeros(len(indices))
    labels = np.full(len(indices), -1, dtype=np.int64)
    for res in results:
        at = np.searchsorted(indices, res.indices.numpy())
        probs = res.loo_class_probs().double().numpy()
        if probs.shape[1] != classes:
            raise ValueError(f"the results have {classes} and {probs.shape[1]} classes")
        total[at] += probs
        count[at] += 1
        labels[at] = res.targets.numpy().astype(np.int64)
    probs = total / count[:, None]
    probs /= probs.sum(1, keepdims=True)  # cleanlab checks that rows sum to 1 at float64 precision
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= classes:
        raise ValueError(f"labels must lie in 0..{classes - 1}, the model's classes")
    return indices, labels, probs


def find_label_issues(results: Results, **kwargs: Any) -> np.ndarray:
    """The dataset indices cleanlab's ``filter.find_label_issues`` flags, most likely issue first (``kwargs`` go to
    cleanlab; default ranking: self-confidence)."""
    from cleanlab.filter import find_label_issues as find

    indices, labels, probs = pred_probs(results)
    kwargs.setdefault("return_indices_ranked_by", "self_confidence")
    return indices[find(labels, probs, **kwargs)]


def label_quality(results: Results, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cleanlab's label-quality score per example: low is likely mislabeled)."""
    from cleanlab.rank import get_label_quality_scores

    indices, labels, probs = pred_probs(results)
    return indices, get_label_quality_scores(labels, probs, **kwargs)


def health_summary(results: Results, **kwargs: Any) -> dict:
    """cleanlab's ``dataset.health_summary`` of the data set (overall label health, classes most confused)."""
    from cleanlab.dataset import health_summary as summary

    _, labels, probs = pred_probs(results)
    kwargs.setdefault("verbose", False)
    return summary(labels, probs, **kwargs)
