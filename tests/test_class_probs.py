"""Each example's LOO class probabilities in the store (both backends), through the API and the CLI, and a worker
run's output fed to the real cleanlab."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store import NotFound, Store, make_engine, upgrade
from worker.service import run_job

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def _probs(n, k, seed):  # rows summing to 1
    p = np.random.default_rng(seed).random((n, k)) + 0.01
    return p / p.sum(1, keepdims=True)


def _evaluate(store, run_id, step, idx, probs):
    store.write_evaluation(run_id, step, loo=0.5, metrics={}, idx=idx, scores=np.ones(len(idx)),
                           loo_losses=np.ones(len(idx)), class_probs=probs)


def test_class_probabilities_are_averaged_over_the_evaluations_by_index(store):
    run = store.create_run("probs", {}, enqueue=False)
    store.add_examples(run.id, range(5000), labels=[i % 3 for i in range(5000)])
    idx = np.random.default_rng(0).permutation(5000)  # written in another order than the index
    first, second, third = _probs(5000, 3, 1), _probs(5000, 3, 2), _probs(5000, 3, 3)
    _evaluate(store, run.id, 10, idx, first)
    step, got_idx, labels, probs, evals = store.class_probs(run.id)
    assert step == 10 and np.array_equal(got_idx, np.arange(5000)) and (evals == 1).all()
    assert np.array_equal(labels, np.arange(5000) % 3)
    assert np.allclose(probs[idx], first, atol=1e-6) and np.allclose(probs.sum(1), 1.0, atol=1e-12)
    _evaluate(store, run.id, 20, np.arange(5000), second)
    _evaluate(store, run.id, 15, np.arange(5000), third)  # an older step written late is not folded in
    step, _, _, probs, evals = store.class_probs(run.id)
    assert step == 20 and (evals == 2).all()
    assert np.allclose(probs[idx], (first + second[idx]) / 2, atol=1e-6)
    _evaluate(store, run.id, 20, np.arange(5000), third)  # step 20 evaluated again (a resumed worker): replaced
    _, _, _, probs, evals = store.class_probs(run.id)
    assert (evals == 2).all() and np.allclose(probs[idx], (first + third[idx]) / 2, atol=1e-6)
    _evaluate(store, run.id, 30, np.arange(100), second[:100])  # a subset: the others keep their averages
    _, _, _, probs, evals = store.class_probs(run.id)
    assert (evals[:100] == 3).all() and (evals[100:] == 2).all()
    expect = (first + third[idx]) / 2
    assert np.allclose(probs[idx[idx >= 100]], expect[idx >= 100], atol=1e-6)


def test_bad_class_probabilities_are_refused_and_nothing_is_written(store):
    run = store.create_run("bad", {}, enqueue=False)
    for probs, match in ((np.ones((4, 1)), "2 to"), (np.ones((3, 2)), "one row per example"),
                         (np.full((4, 2), np.nan), "finite"), (-np.ones((4, 2)), ">= 0")):
        with pytest.raises(ValueError, match=match):
            _evaluate(store, run.id, 1, np.arange(4), probs)
    assert store.evaluations(run.id) == []
    _evaluate(store, run.id, 1, np.arange(4), _probs(4, 2, 0))
    with pytest.raises(ValueError, match="3 classes, the run's earlier ones 2"):
        _evaluate(store, run.id, 2, np.arange(4), _probs(4, 3, 0))
    assert [e.step for e in store.evaluations(run.id)] == [1]
    with pytest.raises(NotFound, match="no class probabilities"):
        store.class_probs(store.create_run("none", {}, enqueue=False).id)
    with pytest.raises(NotFound, match="run 999999"):
        store.class_probs(999999)


def test_the_api_exports_pred_probs_and_deleting_the_run_removes_them(store):
    client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    run = store.create_run("api", {}, enqueue=False)
    store.add_examples(run.id, range(50), labels=[i % 4 for i in range(50)])
    probs = _probs(50, 4, 3)
    _evaluate(store, run.id, 7, np.arange(50), probs)
    r = client.get(f"/api/v1/runs/{run.id}/pred_probs.csv")
    assert r.status_code == 200 and f"run{run.id}_step7_pred_probs.csv" in r.headers["content-disposition"]
    table = np.genfromtxt(io.StringIO(r.text), delimiter=",", names=True)
    assert table.dtype.names == ("idx", "label", "evals", "p_0", "p_1", "p_2", "p_3")
    assert np.allclose(np.stack([table[f"p_{k}"] for k in range(4)], 1), probs, atol=1e-6)
    assert client.get(f"/api/v1/runs/{run.id}/pred_probs.parquet").content[:4] == b"PAR1"
    empty = store.create_run("none", {}, enqueue=False)
    r = client.get(f"/api/v1/runs/{empty.id}/pred_probs.csv")
    assert r.status_code == 404 and "no class probabilities" in r.text
    r = client.get(f"/api/v1/runs/{run.id}/pred_probs.xlsx")
    assert r.status_code == 422 and "fmt" in r.text  # the field named
    store.delete_run(run.id)
    with pytest.raises(NotFound):
        store.class_probs(run.id)


def test_a_worker_runs_pred_probs_go_to_cleanlab_from_the_cli(tmp_path):
    cleanlab_filter = pytest.importorskip("cleanlab.filter")
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    config = {"name": "flips", "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [32]}, "epochs": 15,
              "batch_size": 64, "eval_every": 1000, "label_noise": {"fraction": 0.1},
              "early_stopping": {"enabled": False}}
    run = store.create_run("flips", config)
    assert run_job(store, run.id, tmp_path / "ck", log=lambda *_: None) == "done"
    out = tmp_path / "pred_probs.csv"
    done = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "export", str(run.id), "--pred-probs", "--out",
                           str(out), "--db", url], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = np.genfromtxt(out, delimiter=",", names=True)
    probs = np.stack([table[f"p_{k}"] for k in range(10)], 1)
    issues = cleanlab_filter.find_label_issues(table["label"].astype(int), probs / probs.sum(1, keepdims=True))
    rows = store.examples_table(run.id, store.resolve_step(run.id))
    flipped = {i for i, f in zip(rows["idx"], rows["flipped"]) if f}
    found = set(table["idx"][issues].astype(int).tolist())
    assert len(found & flipped) >= 0.5 * len(flipped)  # cleanlab finds most flipped labels from one run's output
    assert len(found & flipped) >= 0.5 * len(found)
