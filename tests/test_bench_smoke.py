"""The benchmarks still run (short versions): a refactor that breaks one is caught here, not when its figures
are next needed. Their figures are not asserted (noisy machines); errors are."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_load_bench_runs_without_errors():
    out = subprocess.run([sys.executable, "bench/load.py", "--seconds", "3", "--jobs", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if "clients" in line]
    assert len(lines) == 2 and all("errors 0, server exceptions 0" in line for line in lines), out.stdout
    assert all("each job ran once: True" in line for line in lines)


@pytest.mark.slow
def test_sensitivity_bench_runs_without_errors():
    out = subprocess.run([sys.executable, "bench/sensitivity.py", "--quick", "--cases", "mlp10,malloc", "--n-cnn",
                          "32"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "heap kept;" in out.stdout  # the process-wide setting the worker uses took effect
    for line in ("first order", "rayleigh", "naive (jacrev)", "glibc's defaults: epoch"):
        assert line in out.stdout, out.stdout


def test_retrain_bench_runs_without_errors():
    out = subprocess.run([sys.executable, "bench/retrain.py", "--examples", "3", "--cases", "logreg"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x faster); LOO" in out.stdout, out.stdout


def test_store_bench_runs_without_errors():
    out = subprocess.run([sys.executable, "bench/store.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for backend in ("sqlite:", "postgresql:"):
        assert backend in out.stdout, out.stdout
    assert out.stdout.count("with running means") == 2 and out.stdout.count("by the running mean") == 4


def _api_bench(tmp_path):
    """bench/api.py as a module, and a store with one evaluation of 200 examples."""
    import importlib.util

    import numpy as np

    from app.store import Store, make_engine, upgrade

    spec = importlib.util.spec_from_file_location("bench_api", ROOT / "bench" / "api.py")
    api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api)
    db = f"sqlite:///{tmp_path}/api.db"
    upgrade(make_engine(db))
    store = Store(db)
    run = store.create_run("bench", enqueue=False)
    store.add_examples(run.id, range(200), labels=[i % 10 for i in range(200)])
    s = np.random.default_rng(0).random(200)
    store.write_evaluation(run.id, 10, loo=0.5, metrics={"test_nll": 0.5}, idx=np.arange(200), scores=s,
                           loo_losses=s, prob_label=1 - s)
    return api, db, run.id


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (.ci/run installs it)")
@pytest.mark.parametrize("mix", ["hot", "mixed"])
def test_api_bench_drives_a_real_server_with_wrk(tmp_path, mix):
    api, db, run_id = _api_bench(tmp_path)
    p50, p99, count, errors, served = api.measure(db, run_id, 200, mix, 1.0, 1.0, "wrk")
    assert count > 0 and errors == 0 and 0 < p50 <= p99  # the Lua script's paths all answer 200
    assert 0 < served <= 1


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (.ci/run installs it)")
def test_api_bench_polling_clients_wait_between_requests(tmp_path):
    api, db, run_id = _api_bench(tmp_path)
    closed = api.measure(db, run_id, 200, "mixed", 1.0, 1.0, "wrk")
    polling = api.measure(db, run_id, 200, "mixed", 1.0, 1.0, "wrk", think_ms=250)
    assert polling[3] == 0 and 0 < polling[2] <= 50 * 5  # at most 4 requests a second per client, plus the first
    assert polling[2] < closed[2]


def test_api_bench_times_one_kept_alive_client(tmp_path):
    api, db, run_id = _api_bench(tmp_path)
    p50, p99 = api.one_client(db, run_id, requests=20)  # raises on any answer but 2xx
    assert 0 < p50 <= p99


@pytest.mark.slow
def test_memory_bench_runs_without_errors():
    out = subprocess.run([sys.executable, "bench/memory.py", "--n", "2000"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "what grows with N" in out.stdout and "memory-mapped:" in out.stdout, out.stdout
