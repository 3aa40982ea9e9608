"""Readers of users' local data: .npz, CSV, an image folder, MNIST idx files, CIFAR-10 python batches, and a
``module:function`` factory. Each returns ``Arrays``; a bad file raises ValueError (or FileNotFoundError) with a
message that names the file and what is wrong, never a bare traceback.
"""

from __future__ import annotations

import csv
import gzip
import importlib
import io
import math
import pickle
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Arrays:
    """Training (and, when the source has one, test) inputs and integer labels; images as N×C×H×W in [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    image_shape: tuple[int, ...] | None = None
    model: Any = None  # a factory's own model (a torch.nn.Module), else None
    refs_train: list[str] | None = None  # where each training example comes from (CSV line, image path); None: its row
    class_names: list[str] | None = None  # label k's name, where the source names its classes
    feature_names: list[str] | None = None  # each input column's name (a CSV's header)


def _existing(path: str | Path, kind: str = "file") -> Path:
    p = Path(path)
    ok = p.is_file() if kind == "file" else p.is_dir()
    if not ok:
        raise FileNotFoundError(f"data {kind} not found: {p}")
    return p


MAP_AUTO_BYTES = 256 * 2**20  # memory_map=None maps files from this size on


def read_npz(path: str, memory_map: bool | None = False, reason_not: str | None = None) -> Arrays:
    """x_train, y_train[, x_test, y_test]; ``memory_map``: the inputs stay in the file (``worker.npz_map``), True
    insisting (ValueError saying why it cannot), None when the file is large and it can; ``reason_not``: why the
    job's other settings rule it out."""
    p = _existing(path)
    if memory_map or (memory_map is None and reason_not is None and p.stat().st_size >= MAP_AUTO_BYTES):
        mapped = _mapped(p, reason_not, insist=bool(memory_map))
        if mapped is not None:
            return mapped
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as err:
        raise ValueError(f"cannot read {p} as .npz: {err}") from None
    if "x_train" not in arrays or "y_train" not in arrays:
        raise ValueError(f"{p} must contain x_train and y_train (has {sorted(arrays)})")
    x = arrays["x_train"]
    return Arrays(x, arrays["y_train"], arrays.get("x_test"), arrays.get("y_test"),
                  tuple(x.shape[1:]) if x.ndim == 4 else None)


def _labels(values: list[str], where: str) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels as given; other labels (class names) numbered in sorted order, with the names."""
    try:
        return np.array([int(v) for v in values], dtype=np.int64), None
    except ValueError:
        names = sorted(set(values))
        if len(names) > 10_000:
            raise ValueError(f"{where}: {len(names)} distinct non-integer labels; is the label column right?") from None
        index = {n: i for i, n in enumerate(names)}
        return np.array([index[v] for v in values], dtype=np.int64), names


def _mapped(p: Path, reason_not: str | None, insist: bool) -> Arrays | None:
    from worker.npz_map import mapped_members

    why = reason_not
    members = None
    if why is None:
        try:
            members = mapped_members(p, ("x_train", "y_train", "x_test", "y_test"))
        except Exception as err:
            raise ValueError(f"cannot read {p} as .npz: {err}") from None
        if members is None:
            why = "its members are compressed (np.savez_compressed); write it with np.savez"
        elif not {"x_train", "y_train", "x_test", "y_test"} <= set(members):
            why = f"it has no test split of its own (x_test, y_test; has {sorted(members)})"
        elif members["x_train"].dtype != np.float32 or members["x_test"].dtype != np.float32:
            why = f"its inputs are {members['x_train'].dtype}, not float32"
    if why is not None:
        if insist:
            raise ValueError(f"data.memory_map: {p} cannot be memory-mapped: {why}")
        return None
    x, xt = members["x_train"], members["x_test"]
    return Arrays(x, np.array(members["y_train"]), xt, np.array(members["y_test"]),
                  tuple(x.shape[1:]) if x.ndim == 4 else None)


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, list[str], list[int]]:
    """Errors name the file, line and column number, never a cell's or the header's text: a data path may point at
    a file that is not meant to be read back (the error is stored on the run, readable through the API)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        col = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 (byte {col} of the line); save the file as UTF-8") from None
    reader, rows = csv.reader(io.StringIO(text, newline="")), []  # (line number, fields)
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num}: not CSV ({err})") from None
    if not rows:
        raise ValueError(f"{path} is empty")
    header, body = rows[0][1], rows[1:]
    if label_column not in header:
        raise ValueError(f"{path} has no column {label_column!r} in its header (line 1, {len(header)} columns)")
    j = header.index(label_column)
    feats = [i for i in range(len(header)) if i != j]
    x = np.empty((len(body), len(feats)), dtype=np.float64)  # the rows as written (kept for the example page)
    for r, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} fields, expected {len(header)}")
        try:
            x[r] = [float(row[i]) for i in feats]
        except ValueError:
            bad = next(i for i in feats if not _is_float(row[i]))
            what = "empty (a missing value: fill it in or drop the row)" if not row[bad].strip() else "not a number"
            raise ValueError(f"{path}, line {line}, column {bad + 1}: {what}") from None  # never the value: no echo
    finite = np.isfinite(x)
    if not finite.all():  # nan, inf: features training cannot use (one pass over the table, not one per row)
        r, c = (int(v[0]) for v in np.nonzero(~finite))
        raise ValueError(f"{path}, line {body[r][0]}, column {feats[c] + 1}: not a finite number (nan or inf)")
    return x, [row[j] for _, row in body], [line for line, _ in body], [header[i] for i in feats]


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_csv(path: str, label_column: str = "label", test_path: str | None = None) -> Arrays:
    """A header row; one column of labels (integers or class names), every other column a number."""
    x, labels, lines, columns = _read_csv(_existing(path), label_column)
    refs = [f"line {n}" for n in lines]
    if test_path is None:
        y, names = _labels(labels, path)
        return Arrays(x, y, refs_train=refs, class_names=names, feature_names=columns)
    xt, labels_t, _, columns_t = _read_csv(_existing(test_path), label_column)
    if columns_t != columns:
        raise ValueError(f"{test_path}: its columns differ from {path}'s (same names in the same order expected)")
    y, names = _labels(labels + labels_t, path)
    return Arrays(x, y[: len(x)], xt, y[len(x):], refs_train=refs, class_names=names, feature_names=columns)


def _read_images(root: Path, size: int | None,
                 classes: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    from PIL import Image, UnidentifiedImageError

    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = classes or found
    if not classes:
        raise ValueError(f"{root} has no class subfolders (expected {root}/<class>/<image>)")
    if unknown := sorted(set(found) - set(classes)):
        raise ValueError(f"{root}: classes {unknown} are not in the training folder")
    xs, ys, refs, mode = [], [], [], None
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES) \
            if (root / name).is_dir() else []
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    mode = mode or ("L" if im.mode in ("1", "L", "I;16", "I", "F") else "RGB")
                    size = size or im.width
                    img = im.convert(mode).resize((size, size), Image.BILINEAR)
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"cannot read image {f}: {err}") from None
            arr = np.asarray(img, dtype=np.float32) / 255.0
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(label)
            refs.append(f"{name}/{f.name}")
    if not xs:
        raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class subfolders")
    return np.stack(xs), np.array(ys, dtype=np.int64), classes, refs


def read_image_folder(path: str, test_path: str | None = None, image_size: int | None = None) -> Arrays:
    """``path/<class>/<image>``; classes numbered in sorted order; images resized to ``image_size`` squares
    (default: the first image's width), grayscale or RGB as the first image is."""
    x, y, classes, refs = _read_images(_existing(path, "folder"), image_size, None)
    xt = yt = None
    if test_path is not None:
        xt, yt, _, _ = _read_images(_existing(test_path, "folder"), x.shape[-1], classes)
        if xt.shape[1] != x.shape[1]:
            xt = xt.mean(1, keepdims=True) if x.shape[1] == 1 else np.repeat(xt, 3, axis=1)
    return Arrays(x, y, xt, yt, tuple(x.shape[1:]), refs_train=refs, class_names=classes)


def _open_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip: {err}") from None
    return data


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format): magic 0x0000 + type 0x08 (unsigned bytes) + ndim, big-endian sizes, data."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (its first 4 bytes are not 00 00 08 0n)")
    ndim = data[3]
    if not 1 <= ndim <= 4 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: bad idx header")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    need = int(np.prod(shape))
    body = data[4 + 4 * ndim :]
    if len(body) != need:
        raise ValueError(f"{path}: {len(body)} data bytes, the header says {need} (truncated or corrupt)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: missing {stem}[.gz]")


def read_mnist(path: str) -> Arrays:
    """A folder with MNIST's four idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-…; .gz too)."""
    root = _existing(path, "folder")
    parts = [read_idx(_find(root, f"{split}-{kind}")) for split in ("train", "t10k")
             for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    (x, y), (xt, yt) = parts[:2], parts[2:]
    for imgs, labels, split in ((x, y, "train"), (xt, yt, "t10k")):
        if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
            raise ValueError(f"{root}: {split} images {imgs.shape} and labels {labels.shape} do not match")
    scale = np.float32(1 / 255)
    return Arrays(x[:, None] * scale, y.astype(np.int64), xt[:, None] * scale, yt.astype(np.int64),
                  (1, *x.shape[1:]))


class _Dtype:
    """A numpy dtype as a pickle describes it, admitted only if it is a plain number (bool, int, float, complex):
    numpy itself never sees the pickle's dtype state (a forged one with object fields crashes the process)."""

    def __init__(self, spec, align=False, copy=False):
        spec = spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec
        if not isinstance(spec, str) or not re.fullmatch(r"[?bBhHiIlLqQefdgFDG]|[biufc]\d{1,2}", spec):
            raise pickle.UnpicklingError(f"refusing dtype {spec!r}: numbers only")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        order = order.decode("ascii", "replace") if isinstance(order, bytes) else order
        if order not in ("<", ">", "|", "=") or any(v is not None for v in state[2:5]):
            raise pickle.UnpicklingError("refusing a dtype with fields or a sub-array: numbers only")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """An ndarray rebuilt from its pickled bytes with ``np.frombuffer`` and a ``_Dtype``; nothing else."""

    def __init__(self, cls=None, shape=None, typecode=None):
        self.array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("not an ndarray state")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes | bytearray):
            raise pickle.UnpicklingError("refusing an ndarray of objects: numbers only")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"bad ndarray shape {shape!r}")
        if math.prod(shape) * dtype.dtype.itemsize != len(raw):
            raise pickle.UnpicklingError(f"ndarray of shape {shape} does not match its {len(raw)} bytes")
        self.array = np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C")


def _latin1(text, encoding="latin1"):  # how protocol 2 carries bytes
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError("refusing _codecs.encode other than latin1")
    return text.encode("latin1")


def _unwrap(obj, depth: int = 0):
    if depth > 20:
        raise pickle.UnpicklingError("nested too deeply")
    if isinstance(obj, _Array):
        if obj.array is None:
            raise pickle.UnpicklingError("an ndarray without its data")
        return obj.array
    if isinstance(obj, dict):
        return {k: _unwrap(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_unwrap(v, depth + 1) for v in obj)
    if isinstance(obj, _Dtype):
        return obj.dtype
    return obj


class _NumbersOnly(pickle.Unpickler):
    """CIFAR-10's batches are pickles: containers, numbers, bytes and numeric arrays, and nothing else (no code
    runs, no numpy object is built from the pickle's own state)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _Array, ("numpy._core.multiarray", "_reconstruct"): _Array,
               ("numpy", "ndarray"): None, ("numpy", "dtype"): _Dtype, ("_codecs", "encode"): _latin1}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return self.ALLOWED[module, name]


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _unwrap(_NumbersOnly(f, encoding="bytes").load())
        data, labels = np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError,
            RuntimeError, OverflowError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{path}: expected N×3072 bytes and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(path: str) -> Arrays:
    """The ``cifar-10-batches-py`` folder: data_batch_1…5 (those present) and test_batch."""
    root = _existing(path, "folder")
    train = sorted(root.glob("data_batch_*"))
    if not train:
        raise FileNotFoundError(f"{root}: no data_batch_* files (expected the cifar-10-batches-py folder)")
    parts = [_cifar_batch(p) for p in train]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    xt, yt = _cifar_batch(_existing(root / "test_batch"))
    scale = np.float32(1 / 255)
    return Arrays(x * scale, y, xt * scale, yt, (3, 32, 32))


def load_factory(spec: str, seed: int) -> Arrays:
    """``module:function``, called as ``function(seed=seed)``; it returns ``(model, (x_train, y_train),
    (x_test, y_test))`` with arrays or tensors (model None: the configured model; test None: a split)."""
    module_name, _, attr = spec.partition(":")
    here = str(Path.cwd())
    added = here not in sys.path
    if added:  # a module in the current folder, also under the installed `ivon-diag` script
        sys.path.append(here)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"data.factory {spec!r}: cannot import it ({type(err).__name__}: {err})") from None
    finally:
        if added:
            sys.path.remove(here)
    try:
        out = fn(seed=seed)
    except Exception as err:  # the user's code: say whose error it is
        raise ValueError(f"data.factory {spec!r} raised {type(err).__name__}: {err}") from None
    try:
        model, (x, y), test = out
    except (TypeError, ValueError) as err:
        raise ValueError(f"data.factory {spec!r} must return (model, (x_train, y_train), (x_test, y_test) or None): "
                         f"{type(err).__name__}: {err}") from None
    arr = [np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for v in (x, y)]
    xt = yt = None
    if test is not None:
        xt, yt = (np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for v in test)
    return Arrays(arr[0], arr[1], xt, yt, tuple(arr[0].shape[1:]) if arr[0].ndim == 4 else None, model)


# A file source: its reader from (data config, confined path, confined test path or None) to Arrays. A new source
# is a reader here plus its name in app.store.job_config's DataConfig.name and FILE_SOURCES.
def _npz(cfg, path: str, test_path: str | None) -> Arrays:
    reason = "data.n_train takes a subset (a copy)" if cfg.n_train is not None else \
        "data.standardize rescales the inputs (a copy)" if cfg.standardize else None
    return read_npz(path, cfg.memory_map, reason)


READERS = {
    "npz": _npz,
    "csv": lambda cfg, path, test_path: read_csv(path, cfg.label_column, test_path),
    "image_folder": lambda cfg, path, test_path: read_image_folder(path, test_path, cfg.image_size),
    "mnist": lambda cfg, path, test_path: read_mnist(path),
    "cifar10": lambda cfg, path, test_path: read_cifar10(path),
}
