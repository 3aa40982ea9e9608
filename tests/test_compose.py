"""docker-compose.yml is checked by parsing it and by running each service's command against the local
PostgreSQL (no Docker engine runs here)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from app.store import Store
from tests.conftest import drop_pg_database, free_port, new_pg_database, serving

ROOT = Path(__file__).parents[1]


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_complete_and_has_no_default_secrets():
    c = _compose()
    assert set(c["services"]) == {"postgres", "migrate", "api", "worker"}
    assert "healthcheck" in c["services"]["postgres"] and "pgdata" in c["volumes"]
    assert c["services"]["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert c["services"]["worker"]["deploy"]["replicas"] >= 2
    api = c["services"]["api"]
    grace = float(api["command"][api["command"].index("--graceful-seconds") + 1])
    assert grace < float(api["stop_grace_period"].rstrip("s"))  # draining ends before Docker's SIGKILL
    text = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"POSTGRES_PASSWORD:\s*\$\{POSTGRES_PASSWORD:\?", text)  # required, never defaulted
    docker = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in docker and "whl/cpu" in docker
    assert '".[cleanlab]"' in docker  # the run page's label-issue estimate (GET /runs/{id}/label_issues)
    env = c["x-app"]["environment"]  # what jobs may touch is the operator's, set for every service
    assert env["IVON_DIAG_DATA_ROOTS"] and env["IVON_DIAG_CHECKPOINT_DIR"] == "/data/checkpoints"
    assert "checkpoints:/data/checkpoints:ro" in api["volumes"]  # the API serves final models, never writes them
    assert "checkpoints:/data/checkpoints" in c["services"]["worker"]["volumes"]


def test_each_service_command_runs_against_local_postgres(tmp_path):
    c = _compose()
    url = new_pg_database()
    env = {**os.environ, "IVON_DIAG_DB": url, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "ivon_diag.cli"]
    try:
        migrate = c["services"]["migrate"]["command"]
        assert migrate[0] == "ivon-diag"
        out = subprocess.run([*cli, *migrate[1:]], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        store = Store(url)
        run = store.create_run("compose", {"name": "compose", "data": {"name": "synthetic", "n_synthetic": 100},
                                           "model": {"name": "logreg"}, "epochs": 1, "eval_every": 2})
        worker = c["services"]["worker"]["command"]
        ck = [a.replace("/data/checkpoints", str(tmp_path / "ck")) for a in worker[1:]]
        out = subprocess.run([*cli, *ck, "--once"], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert store.get_run(run.id).status == "done"
        api = c["services"]["api"]["command"]
        port = free_port()
        with serving([a if a != "8000" else str(port) for a in api[1:]], port, env) as base:
            assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
            assert httpx.get(f"{base}/api/v1/runs/{run.id}").json()["status"] == "done"
        store.engine.dispose()
    finally:
        drop_pg_database(url)
