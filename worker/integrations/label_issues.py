"""cleanlab on one training run: each example's LOO class probabilities are out-of-sample predictions, the
``pred_probs`` cleanlab's label-issue finders take (which it otherwise gets from K-fold cross-validation: K more
trainings). How the two compare on flipped labels: docs/label-issues.md.

    res = compute_sensitivities(model, (x_train, y_train), ivon_variance(optimizer, model))
    issues = find_label_issues(res)          # dataset indices, most likely mislabeled first
    summary = health_summary(res, class_names=names)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sensitivity import SensitivityResult


def pred_probs(result: SensitivityResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, labels, pred_probs) ordered by example index: the LOO class probabilities as cleanlab takes them.
    Labels must be the class indices 0..K-1."""
    if result.targets.ndim != 1 or result.targets.is_floating_point() and not bool(
            (result.targets == result.targets.round()).all()):
        raise ValueError("cleanlab takes integer class labels; these targets are not")
    order = np.argsort(result.indices.numpy(), kind="stable")
    probs = result.loo_class_probs().double().numpy()[order]
    probs /= probs.sum(1, keepdims=True)  # cleanlab checks that rows sum to 1 at float64 precision
    labels = result.targets.numpy()[order].astype(np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= probs.shape[1]:
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}, the model's classes")
    return result.indices.numpy()[order], labels, probs


def find_label_issues(result: SensitivityResult, **kwargs: Any) -> np.ndarray:
    """The dataset indices cleanlab's ``filter.find_label_issues`` flags, most likely issue first (``kwargs`` go to
    cleanlab; default ranking: self-confidence)."""
    from cleanlab.filter import find_label_issues as find

    indices, labels, probs = pred_probs(result)
    kwargs.setdefault("return_indices_ranked_by", "self_confidence")
    return indices[find(labels, probs, **kwargs)]


def label_quality(result: SensitivityResult, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cleanlab's label-quality score per example: low is likely mislabeled)."""
    from cleanlab.rank import get_label_quality_scores

    indices, labels, probs = pred_probs(result)
    return indices, get_label_quality_scores(labels, probs, **kwargs)


def health_summary(result: SensitivityResult, **kwargs: Any) -> dict:
    """cleanlab's ``dataset.health_summary`` of the data set (overall label health, classes most confused)."""
    from cleanlab.dataset import health_summary as summary

    _, labels, probs = pred_probs(result)
    kwargs.setdefault("verbose", False)
    return summary(labels, probs, **kwargs)
