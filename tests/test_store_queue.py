"""The job queue with real worker processes: no job run twice, and a dead worker's job is retaken."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.store import Store

SCRIPT = str(Path(__file__).with_name("_queue_worker.py"))
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


def _spawn(url, wid, log, work, lease):
    return subprocess.Popen([sys.executable, SCRIPT, url, wid, str(log), str(work), str(lease)], env=ENV)


def test_two_workers_take_every_job_once(store_url, tmp_path):
    store = Store(store_url)
    runs = [store.create_run(f"q{i}") for i in range(20)]
    ids = {j.id for r in runs for j in [store.get_job_for_run(r.id)]}
    log = tmp_path / "claims.log"
    procs = [_spawn(store_url, f"w{i}", log, 0.05, 30) for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    claims = [line.split() for line in log.read_text().splitlines()]
    claimed = [int(j) for _, j in claims if int(j) in ids]
    assert sorted(claimed) == sorted(ids)  # each exactly once
    assert {w for w, j in claims if int(j) in ids} == {"w0", "w1"}
    assert all(store.get_job(j).state == "done" for j in ids)


def test_job_of_a_killed_worker_is_retaken_after_its_lease(store_url, tmp_path):
    store = Store(store_url)
    run = store.create_run("dies")
    job_id = store.get_job_for_run(run.id).id
    log = tmp_path / "claims.log"
    victim = _spawn(store_url, "victim", log, 30, 2)  # holds the job 30 s with a 2 s lease
    deadline = time.time() + 30
    while time.time() < deadline and not (log.exists() and f"victim {job_id}" in log.read_text()):
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    time.sleep(2.5)
    rescuer = _spawn(store_url, "rescuer", log, 0.01, 30)
    assert rescuer.wait(timeout=60) == 0
    assert f"rescuer {job_id}" in log.read_text()
    job = store.get_job(job_id)
    assert job.state == "done" and job.attempts == 2 and job.worker_id == "rescuer"


def test_a_worker_claims_only_jobs_on_devices_it_has(store_url):
    store = Store(store_url)  # GPU numbers no other test uses: the PostgreSQL database is shared
    gpu = store.create_run("gpu", {"device": "cuda:901"})
    cpu = store.create_run("cpu", {"device": "cuda:902"})
    later = store.create_run("later", {"device": "cuda:902"})
    assert store.get_job_for_run(gpu.id).device == "cuda:901"
    assert store.create_run("none", {}).id and store.create_run("bad", {"device": 7}).id  # both read as "auto"
    assert store.claim_job("w", devices=["cuda:902"]).run_id == cpu.id  # the older GPU job is skipped, not taken
    assert store.get_job_for_run(gpu.id).state == "queued"
    assert store.waiting_devices(["auto", "cpu", "cuda:902"])["cuda:901"] == 1
    assert store.claim_job("w", devices=["cuda:902"]).run_id == later.id
    assert store.claim_job("w", devices=["cuda:902"]) is None
    assert store.claim_job("w", devices=["cuda:901"]).run_id == gpu.id
    assert "cuda:901" not in store.waiting_devices(["auto"])
    store.enqueue_job(gpu.id)  # a requeued run keeps its device
    assert store.get_job_for_run(gpu.id).device == "cuda:901"
