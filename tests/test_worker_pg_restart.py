"""PostgreSQL restarted during a run: the worker retries and the run completes with every evaluation."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.store import Store, make_engine, upgrade
from tests.conftest import drop_pg_database, new_pg_database

ROOT = Path(__file__).parents[1]
CLUSTER = sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else None


@pytest.mark.slow
@pytest.mark.skipif(CLUSTER is None or not shutil.which("pg_ctlcluster"), reason="no local PostgreSQL cluster")
def test_worker_survives_a_postgres_restart(tmp_path):
    url = new_pg_database()
    try:
        upgrade(make_engine(url))
        store = Store(url)
        job = {
            "name": "pg",
            "data": {"name": "synthetic", "n_synthetic": 600},
            "model": {"name": "mlp", "hidden": [32]},
            "epochs": 12,
            "batch_size": 16,
            "eval_every": 15,
            "early_stopping": {"enabled": False},
        }
        run = store.create_run("pg-restart", job)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ivon_diag.cli",
                "--db",
                url,
                "worker",
                "--once",
                "--checkpoint-dir",
                str(tmp_path / "ck"),
                "--lease",
                "30",
            ],
            env=env,
        )
        deadline = time.time() + 120
        while time.time() < deadline and len(store.evaluations(run.id)) < 2:
            time.sleep(0.1)
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", CLUSTER, "main", "restart"], check=True, timeout=60
        )
        assert p.wait(timeout=300) == 0
        store.engine.dispose()
        store = Store(url)
        assert store.get_run(run.id).status == "done"
        steps = [e.step for e in store.evaluations(run.id)]
        assert steps == list(range(15, 15 * len(steps) + 1, 15)) and len(steps) == 24
        store.engine.dispose()
    finally:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", CLUSTER, "main", "start"], timeout=60)
        drop_pg_database(url)
