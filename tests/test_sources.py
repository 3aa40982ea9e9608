"""Users' local data: CSV, image folders, MNIST idx, CIFAR-10 batches and factories, each read from real files
made here; every bad file gives a message that names the file and the fault."""

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.store import Store
from worker.config import ConfigError, parse_config
from worker.data import Thumbnails, load_dataset
from worker.trainer import build_model

ROOT = Path(__file__).parents[1]


def _data(**kw):
    return parse_config({"data": kw}).data


def _load(**kw):
    return load_dataset(_data(**kw), seed=0)


# ------------------------------------------------------------------------------------------------ CSV
def _write_csv(path, rows, header=("a", "b", "label")):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_csv_with_class_names_and_a_test_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(rng.normal(), rng.normal(), ["cat", "dog", "emu"][i % 3]) for i in range(60)]
    train = _write_csv(tmp_path / "train.csv", rows)
    test = _write_csv(tmp_path / "test.csv", rows[:12])
    d = _load(name="csv", path=str(train), test_path=str(test))
    assert d.n == 60 and len(d.xte) == 12 and d.num_classes == 3 and d.xtr.shape == (60, 2)
    assert d.ytr[:3].tolist() == [0, 1, 2]  # names numbered in sorted order
    assert d.image_shape is None and list(Thumbnails(d)) == [None] * 60
    split = _load(name="csv", path=str(train), test_fraction=0.25, standardize=False)
    assert split.n == 45 and len(split.xte) == 15
    # each training example knows its line (the header is line 1) through the shuffled split; the names are kept
    assert d.class_names == ["cat", "dog", "emu"] and d.refs[:2] == ["line 2", "line 3"]
    assert d.feature_names == ["a", "b"] and d.features.shape == (60, 2)  # the rows as read, beside the standardized
    assert d.features[0].tolist() == pytest.approx(rows[0][:2], rel=1e-6)
    assert float(d.xtr[:, 0].std()) == pytest.approx(1, abs=0.02)
    assert _load(name="digits").features is None  # images: the thumbnail instead
    lines = train.read_text().splitlines()
    for ref, x, y in zip(split.refs, split.xtr, split.ytr):
        row = lines[int(ref.split()[1]) - 1].split(",")
        assert float(row[0]) == pytest.approx(float(x[0]), rel=1e-6) and row[2] == split.class_names[int(y)]


def test_bad_csv_files_name_the_fault(tmp_path):
    with pytest.raises(ValueError, match="no column 'label' in its header"):
        _load(name="csv", path=str(_write_csv(tmp_path / "a.csv", [(1, 2, 0)], header=("a", "b", "y"))))
    with pytest.raises(ValueError, match=r"b.csv, line 3, column 2: not a number$"):
        _load(name="csv", path=str(_write_csv(tmp_path / "b.csv", [(1, 2, 0), (1, "oops", 1)])))
    with pytest.raises(ValueError, match=r"f.csv, line 3, column 1: empty \(a missing value"):
        _load(name="csv", path=str(_write_csv(tmp_path / "f.csv", [(1, 2, 0), ("", 2, 1)])))
    for value in ("nan", "-inf", "1e999"):
        with pytest.raises(ValueError, match=r"g.csv, line 3, column 2: not a finite number \(nan or inf\)$"):
            _load(name="csv", path=str(_write_csv(tmp_path / "g.csv", [(1, 2, 0), (1, value, 1)])))
    with pytest.raises(ValueError, match="line 2: 2 fields, expected 3"):
        _load(name="csv", path=str(_write_csv(tmp_path / "c.csv", [(1, 2)])))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        _load(name="csv", path=str(tmp_path / "none.csv"))
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        _load(name="csv", path=str(tmp_path / "e.csv"))


def test_csv_errors_name_the_line_and_never_echo_the_file(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("a,b,label\n1,2,0\n1,2,0\n3,4,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv, line 4: not UTF-8 \(byte 8 of the line\)"):
        _load(name="csv", path=str(tmp_path / "latin1.csv"))
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:hunter2:/root:/bin/bash\nline two\n")
    for label_column in ("label", "root:x:0:0:hunter2:/root:/bin/bash"):
        with pytest.raises(ValueError) as err:
            _load(name="csv", path=str(secret), label_column=label_column)
        assert "hunter2" not in str(err.value).replace(label_column, "") and "line two" not in str(err.value)
    blank = _write_csv(tmp_path / "blank.csv", [(1, 2, 0), (1, 2, 0)])
    blank.write_text(blank.read_text().replace("\n", "\n\n") + "5,x,1\n")
    with pytest.raises(ValueError, match=r"blank.csv, line 7, column 2: not a number"):  # blank lines counted
        _load(name="csv", path=str(blank))


def test_labels_outside_the_classes_are_refused(tmp_path):
    path = _write_csv(tmp_path / "l.csv", [(i, i, i % 5) for i in range(40)])
    with pytest.raises(ValueError, match="label 3 of training example .* is outside the 3 classes"):
        _load(name="csv", path=str(path), num_classes=3)


# ------------------------------------------------------------------------------------------------ images
def _image_folder(root, classes=("ant", "bee"), per_class=6, size=12, mode="L"):
    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size) if mode == "L" else (size, size, 3)
            arr = (rng.random(shape) * 100 + 150 * c).astype(np.uint8)
            Image.fromarray(arr, mode).save(root / name / f"{i}.png")
    return root


def test_image_folder_resized_with_thumbnails(tmp_path):
    train = _image_folder(tmp_path / "train", mode="RGB")
    test = _image_folder(tmp_path / "test", per_class=2, mode="RGB")
    d = _load(name="image_folder", path=str(train), test_path=str(test), image_size=8)
    assert d.xtr.shape == (12, 3, 8, 8) and d.xte.shape == (4, 3, 8, 8) and d.image_shape == (3, 8, 8)
    assert d.ytr.tolist() == [0] * 6 + [1] * 6 and 0 <= float(d.xtr.min()) and float(d.xtr.max()) <= 1
    png = Thumbnails(d)[0]
    assert png.startswith(b"\x89PNG") and Image.open(__import__("io").BytesIO(png)).size == (32, 32)
    thumbs = Thumbnails(d, test=True)  # made as read, bounded like a list
    assert len(thumbs) == 4 and thumbs[-1] == list(thumbs)[3]
    with pytest.raises(IndexError):
        thumbs[4]
    gray = _load(name="image_folder", path=str(_image_folder(tmp_path / "g")), test_fraction=0.5)
    assert gray.image_shape == (1, 12, 12)
    assert d.class_names == ["ant", "bee"] and d.refs[:2] == ["ant/0.png", "ant/1.png"] and d.refs[-1] == "bee/5.png"
    assert sorted(gray.refs) == sorted({r for r in gray.refs}) and all(r.endswith(".png") for r in gray.refs)


def test_bad_image_folders_name_the_fault(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        _load(name="image_folder", path=str(tmp_path / "empty"))
    root = _image_folder(tmp_path / "broken")
    (root / "bee" / "9.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*9\.png"):
        _load(name="image_folder", path=str(root))
    train, test = _image_folder(tmp_path / "tr"), _image_folder(tmp_path / "te", classes=("ant", "cow"))
    with pytest.raises(ValueError, match=r"classes \['cow'\] are not in the training folder"):
        _load(name="image_folder", path=str(train), test_path=str(test))


# ------------------------------------------------------------------------------------------------ MNIST
def _idx(path, arr, gz=True):
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _mnist(root, n=30, side=10):
    root.mkdir()
    rng = np.random.default_rng(2)
    for split, m in (("train", n), ("t10k", n // 3)):
        _idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (m, side, side)))
        _idx(root / f"{split}-labels-idx1-ubyte", np.arange(m) % 10, gz=False)
    return root


def test_mnist_idx_files(tmp_path):
    d = _load(name="mnist", path=str(_mnist(tmp_path / "mnist")))
    assert d.xtr.shape == (30, 1, 10, 10) and d.xte.shape == (10, 1, 10, 10) and d.num_classes == 10
    assert d.ytr.tolist() == [i % 10 for i in range(30)] and float(d.xtr.max()) <= 1


def test_corrupt_mnist_files_name_the_fault(tmp_path):
    root = _mnist(tmp_path / "m")
    f = root / "train-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: 25 data bytes, the header says 30"):
        _load(name="mnist", path=str(root))
    f.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an idx file of unsigned bytes"):
        _load(name="mnist", path=str(root))
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    _idx(f, np.arange(30) % 10, gz=False)
    with pytest.raises(FileNotFoundError, match="missing t10k-images-idx3-ubyte"):
        _load(name="mnist", path=str(root))


# ------------------------------------------------------------------------------------------------ CIFAR-10
def _cifar(root, batches=2, n=8):
    root.mkdir()
    rng = np.random.default_rng(3)
    for name in [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(range(n))}
        (root / name).write_bytes(pickle.dumps(d, protocol=2))
    return root


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_cifar10_batches_and_no_code_from_pickles(tmp_path):
    d = _load(name="cifar10", path=str(_cifar(tmp_path / "c")))
    assert d.xtr.shape == (16, 3, 32, 32) and d.xte.shape == (8, 3, 32, 32) and d.image_shape == (3, 32, 32)
    bad = _cifar(tmp_path / "evil")
    _Evil.marker = tmp_path / "pwned"
    (bad / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch .*refusing to load"):
        _load(name="cifar10", path=str(bad))
    assert not _Evil.marker.exists()
    (bad / "data_batch_1").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="data_batch_1: not a CIFAR-10 python batch"):
        _load(name="cifar10", path=str(bad))


class _ObjectFieldDtype:
    """A dtype whose pickled state gives it an object field: numpy then reads raw bytes as object pointers."""

    def __reduce__(self):
        return (np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0x01))


class _ForgedArray:
    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (1,), _ObjectFieldDtype(), False, b"\x41" * 8))


class _ForgedScalar:
    def __reduce__(self):
        return (np._core.multiarray.scalar, (_ObjectFieldDtype(), b"\x41" * 8))


@pytest.mark.parametrize("forged", [_ForgedArray, _ForgedScalar])
def test_a_forged_cifar_batch_is_refused_not_a_crash(tmp_path, forged):
    """Before: the process died with SIGSEGV in the unpickler (and every worker that retook the job)."""
    bad = _cifar(tmp_path / "forged")
    (bad / "data_batch_1").write_bytes(pickle.dumps({b"data": forged(), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match="data_batch_1: not a CIFAR-10 python batch .*(numbers only|refusing)"):
        _load(name="cifar10", path=str(bad))


def test_cifar_arrays_keep_their_byte_order_and_layout(tmp_path):
    from worker.sources import _cifar_batch

    data = np.asfortranarray(np.arange(2 * 3072).reshape(2, 3072).astype(">u2") % 256)
    (tmp_path / "b").write_bytes(pickle.dumps({b"data": data, b"labels": [1, 2]}, protocol=2))
    x, y = _cifar_batch(tmp_path / "b")
    assert np.array_equal(x.reshape(2, -1), data.astype(np.uint8)) and y.tolist() == [1, 2]
    (tmp_path / "c").write_bytes(pickle.dumps({b"data": np.zeros(3, dtype=object), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match="numbers only"):
        _cifar_batch(tmp_path / "c")


# ------------------------------------------------------------------------------------------------ factory
FACTORY = textwrap.dedent("""
    import torch

    def make(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(120, 6, generator=g)
        y = (x[:, 0] > 0).long()
        model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
        return model, (x[:90], y[:90]), (x[90:], y[90:])

    def grouped(seed):
        model, train, test = make(seed)
        x, y = train
        conv = torch.nn.Sequential(torch.nn.Unflatten(1, (6, 1, 1)), torch.nn.Conv2d(6, 6, 1, groups=3),
                                   torch.nn.Flatten(), model)
        return conv, train, test

    def broken(seed):
        raise RuntimeError("no data today")

    def wrong(seed):
        return 42
""")


def test_factory_returns_the_model_and_the_data(tmp_path, monkeypatch):
    (tmp_path / "userfactory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = parse_config({"data": {"name": "factory", "factory": "userfactory:make"}})
    d = load_dataset(cfg.data, seed=0)
    assert d.n == 90 and len(d.xte) == 30 and build_model(cfg, d) is d.model and d.model[0].out_features == 7
    with pytest.raises(ValueError, match="'userfactory:broken' raised RuntimeError: no data today"):
        _load(name="factory", factory="userfactory:broken")
    with pytest.raises(ValueError, match="must return"):
        _load(name="factory", factory="userfactory:wrong")
    monkeypatch.setenv("IVON_DIAG_FACTORY_MODULES", "userfactory,nosuchmodule")
    with pytest.raises(ValueError, match="cannot import it"):
        _load(name="factory", factory="nosuchmodule:make")


def test_config_names_what_a_source_needs():
    for name in ("csv", "image_folder", "mnist", "cifar10"):
        with pytest.raises(ConfigError, match=f"data.path is required for name '{name}'"):
            parse_config({"data": {"name": name}})
    with pytest.raises(ConfigError, match="data.factory"):
        parse_config({"data": {"name": "factory"}})
    with pytest.raises(ConfigError, match="data.factory"):
        parse_config({"data": {"name": "factory", "factory": "os.system('x')"}})


def test_train_command_on_an_image_folder_and_a_factory(tmp_path):
    """End to end with the real CLI: images get thumbnails in the store; a factory's model is trained."""
    (tmp_path / "userfactory.py").write_text(FACTORY)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    url = f"sqlite:///{tmp_path / 's.db'}"
    jobs = {"images": {"data": {"name": "image_folder", "path": str(_image_folder(tmp_path / "imgs", per_class=10))},
                       "model": {"name": "cnn"}},
            "factory": {"data": {"name": "factory", "factory": "userfactory:make"}}}
    for name, job in jobs.items():
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(json.dumps({"name": name, **job, "epochs": 2, "batch_size": 8, "eval_every": 3,
                                   "early_stopping": {"enabled": False}}))
        out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", url, "train", str(cfg), "--checkpoint-dir",
                              str(tmp_path / "ck")], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    # K-FAC on a model with a grouped convolution: refused before training, the layer named on the run
    cfg = tmp_path / "grouped.json"
    cfg.write_text(json.dumps({"name": "grouped", "data": {"name": "factory", "factory": "userfactory:grouped"},
                               "sensitivity": {"covariance": "kfac"}, "epochs": 2}))
    out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", url, "train", str(cfg), "--checkpoint-dir",
                          str(tmp_path / "ck")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "layer '1' is a grouped convolution" in out.stdout + out.stderr
    store = Store(url)
    grouped = [r for r in store.list_runs() if r.name == "grouped"][0]
    assert grouped.status == "failed" and "grouped convolution" in (grouped.error or "")
    images, factory = sorted([r for r in store.list_runs() if r.name != "grouped"], key=lambda r: r.name)[::-1][:2]
    assert images.name == "images" and images.status == "done" and factory.status == "done"
    assert store.get_example(images.id, 0).thumbnail.startswith(b"\x89PNG")
    assert len(store.evaluations(factory.id)) >= 2
    import torch

    final = torch.load(tmp_path / "ck" / store.get_run(factory.id).uid / "model.pt")["model"]
    assert final["0.weight"].shape == (7, 6)  # the factory's own architecture


def test_worker_stores_the_reason_and_goes_on(tmp_path):
    """A raising factory, a corrupt file and labels outside the classes each fail their own run with the reason
    stored; the worker then completes the good run queued after them."""
    from app.store import make_engine, upgrade

    (tmp_path / "userfactory.py").write_text(FACTORY)
    root = _mnist(tmp_path / "m")
    (root / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    labels = _write_csv(tmp_path / "l.csv", [(i, i, i % 5) for i in range(40)])
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    base = {"epochs": 1, "eval_every": 5, "early_stopping": {"enabled": False}}
    bad = {"factory": ({"name": "factory", "factory": "userfactory:broken"}, "raised RuntimeError: no data today"),
           "mnist": ({"name": "mnist", "path": str(root)}, "3 data bytes, the header says 9"),
           "labels": ({"name": "csv", "path": str(labels), "num_classes": 3}, "outside the 3 classes")}
    runs = {k: store.create_run(k, {**base, "name": k, "data": d}) for k, (d, _) in bad.items()}
    good = store.create_run("good", {**base, "name": "good", "data": {"name": "synthetic", "n_synthetic": 100}})
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    p = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", url, "worker", "--once", "--checkpoint-dir",
                        str(tmp_path / "ck")], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for k, (_, reason) in bad.items():
        run = store.get_run(runs[k].id)
        assert run.status == "failed" and reason in run.error, (k, run.error)
    assert store.get_run(good.id).status == "done" and store.evaluations(good.id)


def test_csv_features_are_standardized_and_a_diverged_run_says_why(tmp_path):
    """Before: sklearn's wine as a CSV, defaults, ended "done" at training NLL 148,039 and test accuracy 0.33."""
    from sklearn.datasets import load_wine

    from app.store import make_engine, upgrade
    from worker.service import run_job

    wine = load_wine()
    rows = [(*x, wine.target_names[y]) for x, y in zip(wine.data, wine.target)]
    path = _write_csv(tmp_path / "wine.csv", rows, header=(*wine.feature_names, "label"))
    d = _load(name="csv", path=str(path))
    assert d.xtr.mean(0).abs().max() < 1e-5 and (d.xtr.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert d.xte.mean(0).abs().max() > 1e-3  # the test split takes the training split's statistics
    raw = _load(name="csv", path=str(path), standardize=False)
    assert raw.xtr.max() > 1000
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    job = {"data": {"name": "csv", "path": str(path)}, "epochs": 30, "early_stopping": {"enabled": False}}
    ok = store.create_run("wine", {**job, "name": "wine"}, enqueue=False)
    bad = store.create_run("raw", {**job, "name": "raw", "data": {**job["data"], "standardize": False}},
                           enqueue=False)
    assert run_job(store, ok.id, tmp_path / "ck", log=lambda *_: None) == "done"
    assert store.evaluations(ok.id)[-1].metrics["test_accuracy"] > 0.9
    assert run_job(store, bad.id, tmp_path / "ck", log=lambda *_: None) == "failed"
    assert "training diverged" in store.get_run(bad.id).error and "data.standardize" in store.get_run(bad.id).error


def test_a_memory_mapped_npz_trains_to_the_same_weights_and_scores_as_one_in_memory(tmp_path, monkeypatch):
    import torch

    from app.store import make_engine, upgrade
    from worker.service import run_job

    monkeypatch.setenv("IVON_DIAG_DATA_ROOTS", str(tmp_path))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = (rng.normal(size=(300, 1, 6, 6)) + y[:, None, None, None]).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    finals, tables = [], []
    for mapped in (False, True):
        cfg = {"data": {"name": "npz", "path": str(tmp_path / "d.npz"), "memory_map": mapped},
               "model": {"name": "cnn"}, "epochs": 2, "batch_size": 32, "eval_every": 8,
               "early_stopping": {"enabled": False}}
        run = store.create_run(f"mapped={mapped}", cfg)
        assert run_job(store, run.id, tmp_path / "ck", log=lambda *_: None) == "done"
        finals.append(torch.load(tmp_path / "ck" / store.get_run(run.id).uid / "model.pt", weights_only=True))
        tables.append(store.examples_table(run.id, store.resolve_step(run.id)))
    assert all(torch.equal(finals[0]["model"][k], finals[1]["model"][k]) for k in finals[0]["model"])
    assert tables[0]["score"] == tables[1]["score"] and tables[0]["loo_loss"] == tables[1]["loo_loss"]
    assert (tmp_path / "d.npz").read_bytes()[:2] == b"PK"  # the file is only read
    cfg = {"data": {"name": "npz", "path": str(tmp_path / "d.npz"), "memory_map": True}}
    d = _load(**cfg["data"])
    assert isinstance(d.xtr, torch.Tensor) and d.xtr.untyped_storage().nbytes() == 240 * 36 * 4
    np.savez_compressed(tmp_path / "c.npz", x_train=x, y_train=y)
    with pytest.raises(ValueError, match="cannot be memory-mapped: its members are compressed"):
        _load(name="npz", path=str(tmp_path / "c.npz"), memory_map=True)
    np.savez(tmp_path / "n.npz", x_train=x, y_train=y)
    with pytest.raises(ValueError, match="no test split of its own"):
        _load(name="npz", path=str(tmp_path / "n.npz"), memory_map=True)
    np.savez(tmp_path / "f64.npz", x_train=x.astype(np.float64), y_train=y, x_test=x, y_test=y)
    with pytest.raises(ValueError, match="inputs are float64, not float32"):
        _load(name="npz", path=str(tmp_path / "f64.npz"), memory_map=True)
    assert _load(name="npz", path=str(tmp_path / "c.npz")).n == 240  # auto: a small or compressed file loads


def test_every_file_source_the_config_admits_has_a_reader():
    """A data source is a reader in worker.sources plus its name in the job config: nothing else dispatches."""
    from app.store.job_config import FILE_SOURCES, DataConfig
    from worker.sources import READERS

    assert set(READERS) == set(FILE_SOURCES)
    names = DataConfig.model_json_schema()["properties"]["name"]["enum"]
    assert set(names) == {"digits", "synthetic", "factory", *FILE_SOURCES}


def test_a_job_covariance_is_a_provider_in_sensitivity_plus_its_name_in_the_job_config(tmp_path, monkeypatch):
    """Nothing else dispatches: the job schema's names are the registry's, and a provider in a new module of the
    package is found without touching another file."""
    import sensitivity
    from app.store.job_config import COVARIANCES
    from sensitivity import providers as registry  # the module (the package exports only its decorator)

    assert set(registry.registered()) == set(COVARIANCES)
    (tmp_path / "extra_cov_for_test.py").write_text(
        "from sensitivity.providers import provider\n\n\n"
        "@provider('extra_for_test')\n"
        "def build(model, data, *, prior_precision, chunk_size, optimizer_variance):\n"
        "    return ('built', prior_precision)\n")
    monkeypatch.setattr(sensitivity, "__path__", [*sensitivity.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_SCANNED", False)
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    found = registry.registered()
    assert found["extra_for_test"](None, None, prior_precision=2.0, chunk_size=1, optimizer_variance=None) == \
        ("built", 2.0)
    with pytest.raises(ValueError, match="'kfac' is registered twice"):
        registry.provider("kfac")(lambda *a, **k: None)
