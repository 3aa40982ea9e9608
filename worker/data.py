"""Data sets for jobs: sklearn's digits (the offline default), synthetic data, and users' local data
(`worker.sources`: .npz, CSV, an image folder, MNIST, CIFAR-10, a ``module:function`` factory).

Every example keeps a stable index (its row in the training split); image examples get a PNG thumbnail.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from app.store.models import MAX_FEATURES
from worker import access, sources
from worker.config import DataConfig, LabelNoiseConfig

PAIRS = ((1, 7), (3, 8), (4, 9))  # digit pairs that look alike, for class-pair label noise


@dataclass
class Dataset:
    xtr: Tensor
    ytr: Tensor
    xte: Tensor
    yte: Tensor
    num_classes: int
    image_shape: tuple[int, ...] | None
    original: Tensor  # training labels before label noise
    flipped: Tensor  # bool per training example
    model: torch.nn.Module | None = None  # a factory's own model
    refs: list[str] | None = None  # each training example's place in the source (CSV line, image path, row)
    class_names: list[str] | None = None  # label k's name, where the source names classes
    feature_names: list[str] | None = None  # tabular inputs' column names (the example page shows the row)
    features: np.ndarray | None = None  # tabular training inputs as read (before standardization), ≤ MAX_FEATURES

    @property
    def n(self) -> int:
        return len(self.xtr)

    def to(self, device: torch.device) -> Dataset:
        """The tensors that training and evaluation index, on ``device``; original labels and flags stay on the CPU."""
        return replace(self, xtr=self.xtr.to(device), ytr=self.ytr.to(device), xte=self.xte.to(device),
                       yte=self.yte.to(device))


def _split(x: np.ndarray, y: np.ndarray, refs: np.ndarray, test_fraction: float, seed: int):
    """(xtr, xte, ytr, yte, refs of the training split): a stratified split, the same for a seed."""
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte, rtr, _ = train_test_split(x, y, refs, test_size=test_fraction, stratify=y, random_state=seed)
    return xtr, xte, ytr, yte, rtr


def _read_source(cfg: DataConfig, seed: int) -> sources.Arrays:
    if cfg.name == "factory":
        access.check_factory(cfg.factory)
        return sources.load_factory(cfg.factory, seed)
    path = str(access.confined(cfg.path, "data.path"))
    test_path = None if cfg.test_path is None else str(access.confined(cfg.test_path, "data.test_path"))
    return sources.READERS[cfg.name](cfg, path, test_path)


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    image_shape, model, names, columns = None, None, None, None
    if cfg.name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).reshape(-1, 1, 8, 8)
        image_shape = (1, 8, 8)
        xtr, xte, ytr, yte, refs = _split(x, y, _rows(len(x)), cfg.test_fraction, seed)
    elif cfg.name == "synthetic":
        g = np.random.default_rng(seed)
        centers = g.normal(size=(4, 16)) * 2
        y = g.integers(0, 4, size=cfg.n_synthetic)
        x = centers[y] + g.normal(size=(cfg.n_synthetic, 16))
        xtr, xte, ytr, yte, refs = _split(x, y, _rows(len(x)), cfg.test_fraction, seed)
    else:
        src = _read_source(cfg, seed)
        model, image_shape, names, columns = src.model, src.image_shape, src.class_names, src.feature_names
        refs = _rows(len(src.x_train)) if src.refs_train is None else np.asarray(src.refs_train, dtype=object)
        if len(refs) != len(src.x_train):
            raise ValueError(f"the source gave {len(refs)} references for {len(src.x_train)} training examples")
        if src.x_test is not None and src.y_test is not None:
            xtr, ytr, xte, yte = src.x_train, src.y_train, src.x_test, src.y_test
        else:
            xtr, xte, ytr, yte, refs = _split(src.x_train, src.y_train, refs, cfg.test_fraction, seed)
    ytr, yte = np.asarray(ytr), np.asarray(yte)
    if not np.issubdtype(ytr.dtype, np.integer) or not np.issubdtype(yte.dtype, np.integer) \
            or min(ytr.min(initial=0), yte.min(initial=0)) < 0:
        raise ValueError("labels must be non-negative integers")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError(f"inputs and labels differ in length: {len(xtr)} vs {len(ytr)}, {len(xte)} vs {len(yte)}")
    if cfg.n_train is not None and cfg.n_train < len(xtr):
        from sklearn.model_selection import train_test_split

        xtr, _, ytr, _, refs, _ = train_test_split(xtr, ytr, refs, train_size=cfg.n_train, stratify=ytr,
                                                   random_state=seed)
    num_classes = cfg.num_classes or int(max(ytr.max(), yte.max())) + 1
    for labels, split in ((ytr, "training"), (yte, "test")):
        if len(labels) and labels.max() >= num_classes:
            i = int(np.argmax(labels >= num_classes))
            raise ValueError(f"label {int(labels[i])} of {split} example {i} is outside the {num_classes} classes")
    for lo in range(0, len(xtr), 4096):  # in chunks: a memory-mapped set is read, not copied whole
        part = np.asarray(xtr[lo : lo + 4096]).reshape(min(4096, len(xtr) - lo), -1)
        if not np.isfinite(part).all():
            bad = lo + int(np.flatnonzero(~np.isfinite(part).all(1))[0])
            raise ValueError(f"non-finite input values in training example {bad}")
    raw = None  # a tabular row as read, for the example page
    if image_shape is None and np.ndim(xtr) == 2 and 0 < np.shape(xtr)[1] <= MAX_FEATURES:
        raw = np.array(xtr, dtype=np.float64 if np.asarray(xtr).dtype == np.float64 else np.float32)
        columns = columns if columns and len(columns) == raw.shape[1] else [f"x{j}" for j in range(raw.shape[1])]
    if cfg.standardize if cfg.standardize is not None else cfg.name == "csv":
        xtr, xte = standardize(np.asarray(xtr, dtype=np.float64), np.asarray(xte, dtype=np.float64))
    t = torch.tensor(ytr, dtype=torch.long)
    if names is not None and len(names) < num_classes:
        names = names + [str(k) for k in range(len(names), num_classes)]
    return Dataset(_inputs(xtr), t.clone(), _inputs(xte),
                   torch.tensor(yte, dtype=torch.long), num_classes, image_shape, t,
                   torch.zeros(len(t), dtype=torch.bool), model, [str(r) for r in refs], names,
                   columns if raw is not None else None, raw)


def _inputs(x) -> Tensor:
    """float32 inputs as a tensor sharing the array's memory where it can (a memory-mapped array stays in its file;
    a loaded one is not held twice); other dtypes are converted."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable:
        return torch.from_numpy(x)
    return torch.tensor(x, dtype=torch.float32)


def _rows(n: int) -> np.ndarray:
    """References for a source without its own: the row of its training arrays."""
    return np.array([f"row {i}" for i in range(n)], dtype=object)


def standardize(xtr: np.ndarray, xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each feature to zero mean and unit variance over the training split (the test split with the same
    statistics; a constant feature is only centred). Raw tabular features on scales of 1e3 made IVON diverge."""
    mean, std = xtr.mean(0), xtr.std(0)
    std = np.where(std > 0, std, 1.0)
    return (xtr - mean) / std, (xte - mean) / std


def flip(y: Tensor, num_classes: int, fraction: float, mode: str, seed: int) -> tuple[Tensor, Tensor]:
    """Flip ``fraction`` of the labels, uniformly to another class or within the class pairs (1↔7, 3↔8, 4↔9).

    Returns the new labels and the mask of flipped examples.
    """
    rng = np.random.default_rng(seed)
    y = y.clone()
    k = int(round(fraction * len(y)))
    if mode == "pairs":
        partner = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
        eligible = np.array([i for i in range(len(y)) if partner.get(int(y[i]), num_classes) < num_classes])
        idx = rng.choice(eligible, size=min(k, len(eligible)), replace=False)
        for i in idx:
            y[i] = partner[int(y[i])]
    else:
        idx = rng.choice(len(y), size=k, replace=False)
        for i in idx:
            y[i] = (int(y[i]) + int(rng.integers(1, num_classes))) % num_classes
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[torch.as_tensor(idx, dtype=torch.long)] = True
    return y, mask


def inject_label_noise(data: Dataset, cfg: LabelNoiseConfig) -> Dataset:
    """Flip ``cfg.fraction`` of the training labels; which ones is kept in ``data.flipped``."""
    if cfg.fraction == 0:
        return data
    data.ytr, data.flipped = flip(data.ytr, data.num_classes, cfg.fraction, cfg.mode, cfg.seed)
    return data


class Thumbnails(Sequence):
    """PNG thumbnails of the training (or test) images, each made when read (None for non-image data): the store
    inserts them a batch at a time, so a large (memory-mapped) image set never holds all of them at once."""

    def __init__(self, data: Dataset, size: int = 32, test: bool = False):
        self.x = data.xte if test else data.xtr
        self.shape, self.size = data.image_shape, size
        if self.shape is not None and len(self.x):  # one scale for the whole set, read a part at a time
            parts = [(float(p.min()), float(p.max())) for p in self.x.split(4096)]
            self.lo, self.hi = min(p[0] for p in parts), max(p[1] for p in parts)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> bytes | None:
        if not -len(self) <= i < len(self):
            raise IndexError(f"thumbnail {i} of {len(self)}")
        if self.shape is None:
            return None
        from PIL import Image

        img = self.x[i].reshape(self.shape).cpu().numpy()
        arr = ((img - self.lo) / max(self.hi - self.lo, 1e-12) * 255).astype(np.uint8)
        pil = Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0)[..., :3])
        buf = io.BytesIO()
        pil.resize((self.size, self.size), Image.NEAREST).save(buf, format="PNG")
        return buf.getvalue()


class Rows:
    """(inputs, targets, indices) of chosen examples, gathered a chunk at a time as the sensitivity pass reads them
    (a memory-mapped data set is never copied whole); iterable again for passes that read twice."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, chunk: int):
        self.x, self.y, self.ids, self.chunk = x, y, ids, chunk

    def __iter__(self):
        for part in self.ids.split(self.chunk):
            at = part.to(self.x.device)
            yield self.x[at], self.y[at], part
