"""Data, models and training loops shared by the validation experiments (digits, CPU, minutes): digits, the models
and the training step are the product's; breast cancer and the float64 refits are the research's own."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from ivon_core import IVON
from worker.config import DataConfig
from worker.data import flip, load_dataset
from worker.models import mlp, small_cnn
from worker.step import train_step


@dataclass
class Split:
    xtr: Tensor
    ytr: Tensor
    xte: Tensor
    yte: Tensor
    flipped: Tensor | None = None  # bool mask over the training set

    @property
    def n(self) -> int:
        return len(self.xtr)


def digits(n_train: int | None = None, seed: int = 0, dtype=torch.float32, images: bool = False) -> Split:
    """sklearn's digits as a job reads them (``worker.data``: 80/20 stratified, optionally a stratified training
    subset of ``n_train``), in ``dtype`` (exactly: the inputs are sixteenths)."""
    d = load_dataset(DataConfig(name="digits", test_fraction=0.2, n_train=n_train), seed)
    shape = (-1, 1, 8, 8) if images else (-1, 64)
    return Split(d.xtr.to(dtype).reshape(shape), d.ytr, d.xte.to(dtype).reshape(shape), d.yte)


def breast_cancer(n_train: int | None = None, seed: int = 0, dtype=torch.float32) -> Split:
    """sklearn's breast cancer (30 standardized features, 2 classes), 80/20 stratified."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-8
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    if n_train is not None and n_train < len(xtr):
        xtr, _, ytr, _ = train_test_split(xtr, ytr, train_size=n_train, stratify=ytr, random_state=seed)
    return Split(torch.tensor(xtr, dtype=dtype), torch.tensor(ytr), torch.tensor(xte, dtype=dtype), torch.tensor(yte))


def flip_labels(split: Split, fraction: float, mode: str, seed: int) -> Split:
    """Flip ``fraction`` of the training labels: uniformly to another class, or within the class pairs."""
    y, mask = flip(split.ytr, int(split.ytr.max()) + 1, fraction, mode, seed)
    return Split(split.xtr, y, split.xte, split.yte, mask)


def make_model(kind: str, seed: int, dtype=torch.float32, hidden: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "logreg":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    elif kind == "mlp":
        model = mlp(64, 10, (hidden,))
    elif kind == "mlp_tanh":  # smooth, so that L-BFGS finds exact MAPs for the retraining truth
        model = mlp(64, 10, (hidden,), activation="tanh")
    elif kind == "cnn":
        model = small_cnn(1, 10, 8, width=8)
    elif kind == "cnn_tanh":  # smooth, for exact MAPs; small enough for the dense Laplace (1,898 parameters)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                              nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                              nn.Linear(64, 10))
    else:
        raise ValueError(kind)
    return model.to(dtype)


HESS_INIT = 0.3  # the validation's IVON runs (docs/validation.md: the default LOO's scale follows it)


def make_optimizer(name: str, model: nn.Module, n: int, steps: int, weight_decay: float, beta2: float | None = None,
                   lr: float | None = None, hess_init: float = HESS_INIT):
    if name == "ivon":
        return IVON(model.parameters(), lr=lr or 0.5, ess=n, hess_init=hess_init, weight_decay=weight_decay,
                    beta2=0.99999 if beta2 is None else beta2)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr or 1e-3, weight_decay=weight_decay / (lr or 1e-3))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr or 0.05, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(name)


def train_epoch(model: nn.Module, opt, split: Split, batch: int, gen: torch.Generator) -> None:
    """One epoch of the product's training step (``worker.trainer.train_step``) over a random order."""
    for idx in torch.randperm(split.n, generator=gen).split(batch):
        train_step(model, opt, split.xtr[idx], split.ytr[idx])


def train(kind: str, opt_name: str, split: Split, epochs: int, seed: int, weight_decay: float = 1e-4, batch: int = 64,
          beta2: float | None = None, lr: float | None = None, callback=None, dtype=torch.float32):
    """Train; ``callback(epoch, model, opt, epoch_seconds)`` after each epoch. Returns (model, opt, seconds)."""
    model = make_model(kind, seed, dtype)
    steps = epochs * ((split.n + batch - 1) // batch)
    opt = make_optimizer(opt_name, model, split.n, steps, weight_decay, beta2, lr)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for ep in range(epochs):
        t = time.perf_counter()
        train_epoch(model, opt, split, batch, gen)
        dt = time.perf_counter() - t
        total += dt
        if callback is not None:
            callback(ep + 1, model, opt, dt)
    return model, opt, total
