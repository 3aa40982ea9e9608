"""An unwritable database: a clear failure, nothing marked failed that was not the run's fault, and the job goes
back to the queue and resumes from its checkpoint once the database accepts writes again."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store import Store, WriteRefused, make_engine, upgrade
from tests.conftest import _pg_admin, drop_pg_database, new_pg_database

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
JOB = {"name": "ro", "data": {"name": "synthetic", "n_synthetic": 600}, "model": {"name": "mlp", "hidden": [32]},
       "epochs": 8, "batch_size": 16, "eval_every": 15, "early_stopping": {"enabled": False}}


def _until(done, seconds: float) -> None:
    """Poll ``done`` until it holds or ``seconds`` pass (the caller asserts what it expected)."""
    deadline = time.time() + seconds
    while time.time() < deadline and not done():
        time.sleep(0.2)


def _read_only(url: str, on: bool) -> None:
    """Put a PostgreSQL database in (or out of) read-only mode, as a failover to a replica would, and drop its
    sessions so that every new one sees the setting."""
    name = url.rsplit("/", 1)[1]
    with _pg_admin() as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def _readonly_sqlite(tmp_path):
    path = tmp_path / "ro.db"
    url = f"sqlite:///{path}"
    upgrade(make_engine(url))
    store = Store(url)
    run = store.create_run("queued", JOB)
    return f"sqlite:///file:{path}?mode=ro&uri=true", store, run


def test_sqlite_read_only_file_is_a_clear_error_and_loses_nothing(tmp_path):
    ro_url, store, run = _readonly_sqlite(tmp_path)
    with pytest.raises(WriteRefused, match="read-only"):
        Store(ro_url).create_run("x", JOB)
    p = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", ro_url, "worker", "--once", "--checkpoint-dir",
                        str(tmp_path / "ck")], env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "refuses writes (the database is read-only)" in p.stderr
    assert "Traceback" not in p.stderr
    assert store.get_run(run.id).status == "queued" and store.get_job_for_run(run.id).state == "queued"


def test_api_write_to_read_only_database_is_503_with_the_reason(tmp_path):
    ro_url, store, _ = _readonly_sqlite(tmp_path)
    token = store.create_token("t")
    client = TestClient(create_app(Settings(db=ro_url)))
    r = client.post("/api/v1/runs", json={"config": JOB}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 503
    assert "refuses writes" in r.json()["detail"] and "Traceback" not in r.text
    assert client.get("/api/v1/runs").status_code == 200  # reads go on
    assert len(store.list_runs()) == 1


@pytest.mark.slow
def test_postgres_turned_read_only_mid_run(tmp_path):
    url = new_pg_database()
    log = tmp_path / "worker.log"
    p = None
    try:
        upgrade(make_engine(url))
        store = Store(url)
        run = store.create_run("read-only", JOB)
        with open(log, "w") as out:
            p = subprocess.Popen([sys.executable, "-m", "ivon_diag.cli", "--db", url, "worker", "--lease", "2",
                                  "--checkpoint-dir", str(tmp_path / "ck")], env=ENV, stdout=out, stderr=out)
        _until(lambda: len(store.evaluations(run.id)) >= 2, 120)
        assert len(store.evaluations(run.id)) >= 2
        _read_only(url, True)
        _until(lambda: "goes back to the queue" in log.read_text(), 60)
        text = log.read_text()
        assert "refuses writes (the database is read-only)" in text and "goes back to the queue" in text, text
        assert p.poll() is None  # the worker keeps serving
        assert store.get_run(run.id).status == "running"  # not marked failed: it was not the run's fault
        time.sleep(3)  # the lease expires meanwhile
        _read_only(url, False)
        _until(lambda: store.get_run(run.id).status != "running", 240)
        assert store.get_run(run.id).status == "done", log.read_text()[-2000:]
        steps = [e.step for e in store.evaluations(run.id)]
        n_train = store.get_run(run.id).n_examples
        total = JOB["epochs"] * -(-n_train // JOB["batch_size"])
        expected = sorted({*range(JOB["eval_every"], total + 1, JOB["eval_every"]), total})
        assert steps == expected  # none missing, none twice
        assert store.get_job_for_run(run.id).attempts >= 2
        assert "resumed at step" in log.read_text()
    finally:
        if p is not None:
            p.terminate()
            p.wait(timeout=60)
        drop_pg_database(url)


def _immutable(paths, on: bool) -> bool:
    return subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], capture_output=True).returncode == 0


def test_sqlite_made_immutable_mid_run_then_writable_the_worker_recovers_by_itself(tmp_path):
    """The reported drill: `chattr +i` mid-run. Before: API writes gave 500 ("disk I/O error" unmapped); the worker
    kept connections opened read-only and looped claim → refused → release until restarted."""
    path = tmp_path / "ro.db"
    url = f"sqlite:///{path}"
    upgrade(make_engine(url))
    store = Store(url)
    run = store.create_run("immutable", JOB)
    files = [path, Path(f"{path}-wal")]  # the -shm stays: SQLite maps it, and a write to it would be a SIGBUS
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "ivon_diag.cli", "--db", url, "worker", "--lease", "2",
                              "--checkpoint-dir", str(tmp_path / "ck")], env=ENV, stdout=out, stderr=out)
    try:
        _until(lambda: len(store.evaluations(run.id)) >= 2, 120)
        client = TestClient(create_app(Settings(db=url)), raise_server_exceptions=False)
        auth = {"Authorization": f"Bearer {store.create_token('t')}"}
        if not _immutable(files, True):
            pytest.skip("chattr +i is not available here (needs root on ext4 or similar)")
        try:
            r = client.post("/api/v1/runs", json={"config": JOB}, headers=auth)
            assert r.status_code == 503 and "refuses writes" in r.json()["detail"], r.text
            assert client.get(f"/api/v1/runs/{run.id}").status_code == 200  # reads go on
            _until(lambda: "refuses writes" in log.read_text(), 60)
            assert "refuses writes" in log.read_text() and p.poll() is None
        finally:
            _immutable(files, False)
        _until(lambda: store.get_run(run.id).status != "running", 120)
        assert store.get_run(run.id).status == "done", log.read_text()[-3000:]
        steps = [e.step for e in store.evaluations(run.id)]
        assert steps == sorted(set(steps)) and len(steps) >= 4  # none lost, none twice
    finally:
        p.terminate()
        p.wait(timeout=60)
