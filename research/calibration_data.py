"""The calibration study's data: a class-stratified split and the two generated data sets (research.calibration)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from torch import nn

from research.setups import Split
from worker.data import flip


def stratified(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    if n >= len(labels):
        return np.arange(len(labels))
    ids, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    return np.sort(ids)


def synthetic(n_train: int, n_test: int, seed: int, flips: float = 0.0) -> Split:
    """make_classification: 40 features, 10 classes, 5% label noise (plus ``flips`` memorizable flips, test alike)."""
    x, y = make_classification(n_train + n_test, n_features=40, n_informative=20, n_redundant=5, n_classes=10,
                               n_clusters_per_class=2, flip_y=0.05, class_sep=1.0, random_state=1000 + seed)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=n_test, stratify=y, random_state=seed)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-8
    split = Split(torch.tensor((xtr - mu) / sd, dtype=torch.float32), torch.tensor(ytr),
                  torch.tensor((xte - mu) / sd, dtype=torch.float32), torch.tensor(yte))
    if flips:
        ytr_f, mask = flip(split.ytr, 10, flips, "uniform", seed)
        yte_f, _ = flip(split.yte, 10, flips, "uniform", seed + 7)  # the LOO's target: data like the training data
        split = Split(split.xtr, ytr_f, split.xte, yte_f, mask)
    return split


def textures(n_train: int, n_test: int, seed: int, side: int = 16) -> Split:
    """Images: each of 10 classes has 3 smooth random templates; an example is one of its class's templates, shifted
    at random (wrapping), scaled and buried in pixel noise; every example is drawn independently."""
    g = torch.Generator().manual_seed(2000 + seed)
    kernel = torch.exp(-torch.arange(-3, 4, dtype=torch.float32).square() / 4)
    kernel = (kernel[:, None] * kernel[None, :])[None, None] / kernel.sum() ** 2
    raw = torch.randn(30, 1, side, side, generator=g)
    templates = nn.functional.conv2d(nn.functional.pad(raw, (3, 3, 3, 3), mode="circular"), kernel)
    templates = templates / templates.flatten(1).std(1)[:, None, None, None]
    n = n_train + n_test
    y = torch.arange(n) % 10
    which = y * 3 + torch.randint(0, 3, (n,), generator=g)
    shifts = torch.randint(-4, 5, (n, 2), generator=g)
    x = torch.stack([templates[w].roll((int(a), int(b)), (1, 2)) for w, (a, b) in zip(which, shifts)])
    x = x * (0.5 + torch.rand(n, 1, 1, 1, generator=g)) + 0.9 * torch.randn(n, 1, side, side, generator=g)
    order = torch.randperm(n, generator=g)
    x, y = x[order], y[order]
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])
