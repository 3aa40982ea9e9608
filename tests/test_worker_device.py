"""The job's ``device``: validation, a device that is not there, and on a GPU the same job as on the CPU
(the CUDA tests are skipped where no GPU is present; tests/test_worker.py's kill-and-resume runs on the GPU there,
since ``auto`` picks it)."""

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from app.store import Store, make_engine, upgrade
from worker import distributed as D
from worker.config import ConfigError, parse_config
from worker.service import run_job
from worker.trainer import Trainer

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

JOB = {"data": {"name": "digits", "n_train": 400}, "model": {"name": "mlp", "hidden": [64]}, "epochs": 4,
       "batch_size": 32, "eval_every": 13, "optimizer": {"noise": "counter"}, "early_stopping": {"enabled": False}}


def _store(tmp_path) -> Store:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(make_engine(url))
    return Store(url)


def _run(store, tmp_path, device, name="job", stop=None, **extra):
    run = store.create_run(name, {**JOB, "name": name, "device": device, **extra})
    state = run_job(store, run.id, tmp_path / "ck", stop_event=stop, log=lambda *a, **k: None)
    return run.id, state


def test_device_setting_is_validated():
    assert parse_config({}).device == "auto"
    for ok in ("cpu", "cuda", "cuda:1", "auto"):
        assert parse_config({"device": ok}).device == ok
    for bad in ("tpu", "cuda:", "cuda:x", "CPU", "cuda:0,1"):
        with pytest.raises(ConfigError, match="device"):
            parse_config({"device": bad})


def test_auto_picks_a_gpu_only_when_one_is_there():
    want = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert D.resolve_device("auto") == want
    assert D.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("gpus,local_world,rank,want_auto,want_claims", [
    (0, 1, 0, "cpu", ["auto", "cpu"]),
    (2, 1, 0, "cuda:0", ["auto", "cpu", "cuda", "cuda:0", "cuda:1"]),
    (2, 2, 1, "cuda:1", ["auto", "cpu", "cuda"]),  # torchrun: each rank its own GPU, none named for all
    (1, 2, 1, "cpu", ["auto", "cpu"]),  # fewer GPUs than local ranks: auto trains on the CPU, cuda is not taken
])
def test_device_choice_per_rank(monkeypatch, gpus, local_world, rank, want_auto, want_claims):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    env = {"WORLD_SIZE": str(local_world), "LOCAL_WORLD_SIZE": str(local_world), "LOCAL_RANK": str(rank)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert str(D.resolve_device("auto")) == want_auto
    assert D.claimable_devices() == want_claims
    if rank < gpus:
        assert D.resolve_device("cuda") == torch.device("cuda", rank)
    elif gpus:  # this rank has no GPU of its own: a clear error, not another rank's GPU
        with pytest.raises(ValueError, match=f"sees {gpus} CUDA device"):
            D.resolve_device("cuda")
    if gpus:
        with pytest.raises(ValueError, match=f"no cuda:{gpus}"):
            D.resolve_device(f"cuda:{gpus}")


def test_a_device_that_is_not_there_fails_the_run_with_a_clear_error(tmp_path):
    store = _store(tmp_path)
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    run_id, state = _run(store, tmp_path, missing, name="nowhere")
    run = store.get_run(run_id)
    assert state == "failed" and run.status == "failed"
    assert missing in run.error and ("no CUDA device" in run.error or "no cuda:" in run.error)
    assert store.evaluations(run_id) == []  # failed before training: nothing half written
    run_id, state = _run(store, tmp_path, "cpu", name="after")  # the worker goes on with the next job
    assert state == "done" and len(store.evaluations(run_id)) == 4


def test_a_worker_leaves_a_job_for_a_device_it_lacks_queued_and_says_why(tmp_path):
    store = _store(tmp_path)
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    waits = store.create_run("waits", {**JOB, "name": "waits", "device": missing})
    runs = store.create_run("runs", {**JOB, "name": "runs", "device": "cpu"})
    out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", str(store.engine.url), "worker", "--once",
                          "--checkpoint-dir", str(tmp_path / "ck")], env=ENV, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    assert store.get_run(runs.id).status == "done"
    job = store.get_job_for_run(waits.id)
    assert store.get_run(waits.id).status == "queued" and job.state == "queued" and job.attempts == 0
    assert f"1 queued job(s) ask for device '{missing}'" in out.stdout + out.stderr


@cuda
def test_a_job_on_the_gpu_matches_the_same_job_on_the_cpu(tmp_path):
    store = _store(tmp_path)
    gpu, state = _run(store, tmp_path, "cuda", name="gpu")
    assert state == "done"
    cpu, state = _run(store, tmp_path, "cpu", name="cpu")
    assert state == "done"
    eg, ec = store.evaluations(gpu), store.evaluations(cpu)
    assert [e.step for e in eg] == [e.step for e in ec] == [13, 26, 39, 52]
    for a, b in zip(eg, ec):  # the counter noise is the same stream on both devices: only rounding differs
        print(f"step {a.step}: loo gpu {a.loo:.6f} cpu {b.loo:.6f} test_nll {a.metrics['test_nll']:.6f} "
              f"{b.metrics['test_nll']:.6f}")
        assert math.isclose(a.loo, b.loo, rel_tol=2e-2)
        assert math.isclose(a.metrics["test_nll"], b.metrics["test_nll"], rel_tol=2e-2)
    ta, tb = store.examples_table(gpu, 52), store.examples_table(cpu, 52)
    assert len(ta["idx"]) == 400 and all(math.isfinite(v) for v in ta["loo_loss"])
    top_a, top_b = set(ta["idx"][:40]), set(tb["idx"][:40])
    assert len(top_a & top_b) >= 30  # the same most sensitive examples
    assert store.get_example(gpu, ta["idx"][0]).thumbnail[:4] == b"\x89PNG"  # made from data held on the GPU


@cuda
def test_a_gpu_checkpoint_resumes_on_the_cpu(tmp_path, monkeypatch):
    store = _store(tmp_path)
    stop = threading.Event()
    write = Store.write_evaluation

    def write_then_stop(self, *a, **k):  # the job is released right after its first evaluation
        write(self, *a, **k)
        stop.set()

    monkeypatch.setattr(Store, "write_evaluation", write_then_stop)
    run_id, state = _run(store, tmp_path, "cuda", name="moved", stop=stop)
    monkeypatch.undo()
    assert state == "queued" and [e.step for e in store.evaluations(run_id)] == [13]
    cfg = parse_config({**store.get_run(run_id).config, "device": "cpu"})
    trainer = Trainer(cfg, store, run_id, tmp_path / "ck", store.get_run(run_id).uid, log=lambda *a, **k: None)
    assert trainer.run() == "done"
    assert [e.step for e in store.evaluations(run_id)] == [13, 26, 39, 52]
    final = torch.load(tmp_path / "ck" / store.get_run(run_id).uid / "model.pt")["model"]
    assert all(not t.is_cuda and torch.isfinite(t).all() for t in final.values())
