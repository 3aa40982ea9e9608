import subprocess
import sys

from ivon_diag.demo import run_demo


def test_demo_finds_flipped_labels_among_the_most_sensitive():
    lines = []
    hist = run_demo(epochs=10, eval_every=5, out=lines.append)
    assert len(hist) == 2 and "flipped" in lines[0]
    last = hist[-1]
    assert last["flipped_in_top"] > 0.5  # 10% flipped: chance would be 0.1
    assert last["flipped_in_top_by_mean"] > 0.5 and "by mean LOO loss" in lines[1]
    assert last["loo"] > last["train_nll"]


def test_cli_rejects_bad_arguments_with_a_clear_message():
    out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "demo", "--flip", "1.5"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "Invalid flip fraction" in out.stderr and "Traceback" not in out.stderr


def test_serve_demo_queues_a_noisy_digits_job_and_serves_it(tmp_path):
    import os
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "ivon_diag.cli", "--db", db, "demo", "--epochs", "2", "--port",
                             str(port)], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/runs/1" in line
        deadline = time.time() + 120
        page = None
        while time.time() < deadline:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/api/v1/runs/1/examples", params={"limit": 50}, timeout=2)
                if page.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert page is not None and page.status_code == 200
        assert sum(bool(i["flipped"]) for i in page.json()["items"]) >= 5  # flips among the 50 most sensitive
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)


def test_a_demo_on_a_taken_port_says_so_and_queues_nothing(tmp_path):
    import socket

    from app.store import Store

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = f"sqlite:///{tmp_path / 'demo.db'}"
        out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", db, "demo", "--port", str(port)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"port {port} on 127.0.0.1 is taken" in out.stderr and "--port" in out.stderr
    assert "dashboard:" not in out.stdout and "Traceback" not in out.stderr
    assert not (tmp_path / "demo.db").exists() or Store(db).list_runs() == []  # no run left queued
