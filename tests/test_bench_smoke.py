"""The benchmarks still run (short versions): a refactor that breaks one is caught here, not when its figures
are next needed. Their figures are not asserted (noisy machines); errors are."""

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
