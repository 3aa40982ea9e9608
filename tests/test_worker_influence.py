"""Influence queries on a finished worker run, from the CLI: its saved weights and posterior, its data as loaded."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store import Store, make_engine, upgrade
from worker.influence import answer_next, query_run
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
    store.request_stop(run.id)  # trained in-process: its queued job is cancelled (no worker below trains it again)
    store.set_run_status(run.id, "done")  # and the run marked done, as a worker would
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


def test_the_api_queues_a_query_a_worker_answers_it_and_webhooks_hear_of_it(finished, receiver, monkeypatch):
    url, store, run, ck = finished
    client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {store.create_token('influence-test')}"}
    hook_url, state = receiver
    monkeypatch.setenv("IVON_DIAG_WEBHOOK_ALLOW", "127.0.0.1/32")
    store.add_hook(hook_url, ["influence"], run_id=run.id, secret="k")
    r = client.post(f"/api/v1/runs/{run.id}/influence", json={"test": [2, 4], "k": 3}, headers=auth)
    assert r.status_code == 202 and r.json()["status"] == "pending" and r.json()["result"] is None
    good = r.json()["id"]
    bad = client.post(f"/api/v1/runs/{run.id}/influence", json={"test": [99999]}, headers=auth).json()["id"]
    assert answer_next(store, ck, "w-test", log=lambda *_: None)
    done = client.get(f"/api/v1/influence/{good}").json()
    assert done["status"] == "done" and done["result"] == query_run(store, run.id, [2, 4], ck, k=3)
    worker = _cli(url, "worker", "--once", "--checkpoint-dir", str(ck))  # a real worker answers the other
    assert worker.returncode == 0, worker.stderr
    failed = client.get(f"/api/v1/influence/{bad}").json()
    assert failed["status"] == "failed" and "outside the run's test set" in failed["error"]
    assert [q["id"] for q in client.get(f"/api/v1/runs/{run.id}/influence").json()][:2] == [bad, good]
    assert not answer_next(store, ck, "w-test", log=lambda *_: None)  # nothing left
    for _ in range(50):
        if state["got"]:
            break
        time.sleep(0.1)
    assert json.loads(state["got"][0][1])["event"] == "influence"


def test_bad_influence_requests_are_refused_naming_the_field(finished):
    url, store, run, ck = finished
    client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {store.create_token('influence-bad')}"}
    assert client.post(f"/api/v1/runs/{run.id}/influence", json={"test": [1]}).status_code == 401
    for body, field in (({"test": []}, "test"), ({"test": list(range(101))}, "test"), ({"test": [-1]}, "test"),
                        ({"test": [1], "k": 0}, "k"), ({"test": [1], "extra": 1}, "extra")):
        r = client.post(f"/api/v1/runs/{run.id}/influence", json=body, headers=auth)
        assert r.status_code == 422 and field in str(r.json()["detail"][0]["loc"]), (body, r.text)
    assert client.post("/api/v1/runs/999999/influence", json={"test": [1]}, headers=auth).status_code == 404
    assert client.get("/api/v1/influence/999999").status_code == 404


def test_a_query_on_a_run_still_training_waits_and_one_that_failed_says_why(finished):
    url, store, run, ck = finished
    client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {store.create_token('influence-wait')}"}
    other = store.create_run("training", JOB, enqueue=False)
    store.set_run_status(other.id, "running")
    r = client.post(f"/api/v1/runs/{other.id}/influence", json={"test": [1]}, headers=auth)
    assert r.status_code == 202
    assert not answer_next(store, ck, "w-wait", log=lambda *_: None)  # waits for the run to end
    store.set_run_status(other.id, "failed", error="boom")
    assert answer_next(store, ck, "w-wait", log=lambda *_: None)
    failed = client.get(f"/api/v1/influence/{r.json()['id']}").json()
    assert failed["status"] == "failed" and "ended failed: it has no final model" in failed["error"]


def test_a_query_at_a_kept_evaluation_and_the_reason_when_a_step_was_not_kept(tmp_path):
    from worker.checkpoints import kept_steps

    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    run = store.create_run("states", {**JOB, "eval_every": 20, "sensitivity": {"keep_states": 2}})
    ck = tmp_path / "ck"
    assert run_job(store, run.id, ck, log=lambda *_: None) == "done"
    store.request_stop(run.id)
    store.set_run_status(run.id, "done")
    steps = kept_steps(ck / run.uid)
    evaluated = [e.step for e in store.evaluations(run.id)]
    assert len(evaluated) > 2 and steps == evaluated[-2:]  # the newest two, the older ones pruned
    early = query_run(store, run.id, [0, 1], ck, k=3, step=steps[0])
    final = query_run(store, run.id, [0, 1], ck, k=3)
    assert [r["step"] for r in early] == [steps[0]] * 2 and final[0]["step"] == steps[-1]
    assert early[0]["loss"] != final[0]["loss"]  # another model: the run as it was then
    with pytest.raises(FileNotFoundError, match=rf"kept no state at step 1 \(kept: {steps[0]}, {steps[1]};"):
        query_run(store, run.id, [0], ck, step=1)
    out = _cli(url, "influence", str(run.id), "--test", "0", "--step", str(steps[0]), "--checkpoint-dir", str(ck))
    assert out.returncode == 0 and f"step {steps[0]})" in out.stdout
    # through the API: a step is an integer, a step not kept fails with the reason, a kept one is answered
    client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {store.create_token('states-test')}"}
    assert client.post(f"/api/v1/runs/{run.id}/influence", json={"test": [0], "step": "3"},
                       headers=auth).status_code == 422
    bad = client.post(f"/api/v1/runs/{run.id}/influence", json={"test": [0], "step": 1}, headers=auth).json()["id"]
    good = client.post(f"/api/v1/runs/{run.id}/influence", json={"test": [0], "k": 2, "step": steps[0]},
                       headers=auth).json()["id"]
    while answer_next(store, ck, "w1", log=lambda *_: None):
        pass
    failed = client.get(f"/api/v1/influence/{bad}").json()
    assert failed["status"] == "failed" and "kept no state at step 1" in failed["error"]
    done = client.get(f"/api/v1/influence/{good}").json()
    assert done["status"] == "done" and done["request"]["step"] == steps[0] and done["result"][0]["step"] == steps[0]
    # a run that ended failed has no final model, but its kept evaluations can still be queried
    store.set_run_status(run.id, "failed")
    final_q = client.post(f"/api/v1/runs/{run.id}/influence", json={"test": [0]}, headers=auth).json()["id"]
    kept_q = client.post(f"/api/v1/runs/{run.id}/influence", json={"test": [0], "step": steps[1]},
                         headers=auth).json()["id"]
    while answer_next(store, ck, "w1", log=lambda *_: None):
        pass
    assert "give its step" in client.get(f"/api/v1/influence/{final_q}").json()["error"]
    assert client.get(f"/api/v1/influence/{kept_q}").json()["status"] == "done"
