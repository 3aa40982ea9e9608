"""Influence queries on a finished worker run, from the CLI: its saved weights and posterior, its data as loaded."""

import json
import os
import subprocess
import sys

import pytest
import torch

from app.store import Store, make_engine, upgrade
from worker.influence import query_run
from worker.service import run_job

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}
JOB = {"name": "influence", "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [16]}, "epochs": 3,
       "batch_size": 64, "eval_every": 1000, "label_noise": {"fraction": 0.1}, "early_stopping": {"enabled": False}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("influence")
    url = f"sqlite:///{tmp / 'w.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    run = store.create_run("influence", JOB)
    assert run_job(store, run.id, tmp / "ck", log=lambda *_: None) == "done"
    return url, store, run, tmp / "ck"


def _cli(url, *args):
    return subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", url, *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_the_cli_names_each_test_examples_proponents_and_opponents(finished):
    url, store, run, ck = finished
    out = _cli(url, "influence", str(run.id), "--test", "0", "5", "--k", "4", "--json", "--checkpoint-dir", str(ck))
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["test_idx"] for r in rows] == [0, 5]
    for r in rows:
        assert r["target"] == r["label"] and r["loss"] > 0
        ups = [e["loss_change"] for e in r["proponents"]]
        downs = [e["loss_change"] for e in r["opponents"]]
        assert len(ups) == len(downs) == 4 and ups == sorted(ups, reverse=True) and downs == sorted(downs)
        assert ups[0] > 0 > downs[0]
    assert rows == query_run(store, run.id, [0, 5], ck, k=4)  # the same numbers from a script
    table = _cli(url, "influence", str(run.id), "--test", "3", "--checkpoint-dir", str(ck))
    assert table.returncode == 0 and "proponents" in table.stdout and "train " in table.stdout


def test_bad_queries_get_the_reason(finished):
    url, store, run, ck = finished
    out = _cli(url, "influence", str(run.id), "--test", "99999", "--checkpoint-dir", str(ck))
    assert out.returncode != 0 and "outside the run's test set" in out.stderr and "Traceback" not in out.stderr
    out = _cli(url, "influence", str(run.id), "--test", "1", "--checkpoint-dir", str(ck / "elsewhere"))
    assert out.returncode != 0 and "has no final model" in out.stderr
    with pytest.raises(ValueError, match="1 to 100 test examples"):
        query_run(store, run.id, list(range(101)), ck)
    state = torch.load(next(ck.glob("*/model.pt")), weights_only=True)
    assert set(state["variance"]) == set(state["model"])  # σ² per parameter, saved with the final weights
