"""Faults: SIGTERM releases the job after a checkpoint; repeated SIGKILLs still end at the uninterrupted weights;
every write route refuses requests without a valid token."""

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store import Store, make_engine, upgrade
from tests.conftest import free_port, start_server

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
JOB = {"name": "faults", "data": {"name": "synthetic", "n_synthetic": 600}, "model": {"name": "mlp", "hidden": [32]},
       "epochs": 10, "batch_size": 16, "eval_every": 10, "early_stopping": {"enabled": False}}


def _worker(url, ck, *extra):
    return subprocess.Popen([sys.executable, "-m", "ivon_diag.cli", "--db", url, "worker", "--checkpoint-dir", str(ck),
                             "--lease", "2", *extra], env=ENV)


def _wait_evals(store, run_id, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and len(store.evaluations(run_id)) < n:
        time.sleep(0.1)
    return len(store.evaluations(run_id))


def test_sigterm_checkpoints_and_releases_the_job(tmp_path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    run = store.create_run("term", JOB)
    p = _worker(url, tmp_path / "ck")
    assert _wait_evals(store, run.id, 2) >= 2
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 0
    job = store.get_job_for_run(run.id)
    assert job.state == "queued" and (tmp_path / "ck" / store.get_run(run.id).uid / "resume.pt").exists()
    p2 = _worker(url, tmp_path / "ck", "--once")
    assert p2.wait(timeout=300) == 0
    assert store.get_run(run.id).status == "done"


CRASH = "import ctypes\n\ndef make(seed):\n    ctypes.string_at(0)  # SIGSEGV, as a forged pickle once did\n"


def test_a_job_that_kills_its_worker_is_failed_and_the_queue_moves_on(tmp_path):
    """Before: every worker that took it died, retook it after the lease, and the job queued behind never ran."""
    (tmp_path / "crashfactory.py").write_text(CRASH)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    crash = store.create_run("crash", {**JOB, "data": {"name": "factory", "factory": "crashfactory:make"}})
    after = store.create_run("after", {**JOB, "epochs": 1})
    env = {**ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    codes = []
    for _ in range(5):
        p = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", url, "worker", "--once", "--lease", "1",
                            "--checkpoint-dir", str(tmp_path / "ck")], env=env, capture_output=True, timeout=300)
        codes.append(p.returncode)
        if p.returncode == 0:
            break
        time.sleep(1.2)  # the dead worker's lease expires
    assert codes == [-signal.SIGSEGV] * 3 + [0]  # three workers died, the fourth failed the job and went on
    run = store.get_run(crash.id)
    assert run.status == "failed" and "stopped without a word 3 times" in run.error
    job = store.get_job_for_run(crash.id)
    assert job.state == "failed" and job.crashes == 3 and job.attempts == 3
    assert store.get_run(after.id).status == "done"


def test_repeated_sigkills_end_at_the_uninterrupted_weights(tmp_path):
    """CI kills 3 times; `KILLS=10 pytest -k repeated` runs the full fault drill (`KILL_SEED` picks the points)."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    kills = int(os.environ.get("KILLS", "3"))
    job = {**JOB, "epochs": max(JOB["epochs"], 3 * kills)}  # room for every kill to land mid-run
    ref = store.create_run("reference", job)
    assert _worker(url, tmp_path / "ck", "--once").wait(timeout=300) == 0
    run = store.create_run("killed", job)
    rng = random.Random(int(os.environ.get("KILL_SEED", "0")))
    allow = ("--max-crashes", str(kills + 1))  # each kill is a crash to the queue: let every one be retaken
    for _ in range(kills):
        before = len(store.evaluations(run.id))
        p = _worker(url, tmp_path / "ck", *allow)
        assert _wait_evals(store, run.id, before + 1, timeout=120) > before  # it holds the job and made progress
        time.sleep(rng.uniform(0, 0.1))  # from the write of an evaluation into the next training steps
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        time.sleep(2.2)  # the lease expires
    assert store.get_run(run.id).status == "running"  # every kill landed before the end
    assert _worker(url, tmp_path / "ck", "--once", *allow).wait(timeout=300) == 0
    a = torch.load(tmp_path / "ck" / store.get_run(ref.id).uid / "model.pt")["model"]
    b = torch.load(tmp_path / "ck" / store.get_run(run.id).uid / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e.step for e in store.evaluations(run.id)] == [e.step for e in store.evaluations(ref.id)]
    assert store.get_job_for_run(run.id).attempts == kills + 1


WRITE_ROUTES = [("post", "/api/v1/runs", {"config": {"name": "x"}}), ("post", "/api/v1/runs/1/stop", None),
                ("post", "/api/v1/hooks", {"url": "http://127.0.0.1:9/", "events": ["finished"]}),
                ("delete", "/api/v1/hooks/1", None), ("get", "/api/v1/hooks", None)]


@pytest.mark.parametrize("method,path,body", WRITE_ROUTES, ids=[f"{m} {p}" for m, p, _ in WRITE_ROUTES])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc"])
def test_every_write_route_refuses_without_a_valid_token(tmp_path, method, path, body, auth):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    store.create_run("r", enqueue=False)
    client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    headers = {"Authorization": auth} if auth else {}
    r = client.request(method, path, json=body, headers=headers)
    assert r.status_code == (403 if auth == "Bearer wrong" else 401)
    assert len(store.list_runs()) == 1 and store.hooks_for(None) == []  # nothing written


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_the_api(tmp_path, workers):
    """A request in flight when SIGTERM arrives completes and its write lands; live streams end; no new
    connection is accepted; the process exits promptly and cleanly (with ``--workers 2``, every server process)."""
    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    token = store.create_token("t")
    live = store.create_run("live", JOB, enqueue=False)
    port = free_port()
    proc, base = start_server(["--db", url, "serve", "--port", str(port), "--workers", str(workers)], port, ENV)
    children = _children(proc.pid)
    assert len(children) == (0 if workers == 1 else 2)
    try:
        stream_lines: list[str] = []
        stream_ended = threading.Event()

        def follow():
            with httpx.stream("GET", f"{base}/api/v1/runs/{live.id}/events", timeout=30) as r:
                for line in r.iter_lines():
                    stream_lines.append(line)
            stream_ended.set()

        threading.Thread(target=follow, daemon=True).start()
        body = json.dumps({"config": {**JOB, "name": "in-flight"}}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"POST /api/v1/runs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:20])
        deadline = time.time() + 10
        while time.time() < deadline and not stream_lines:
            time.sleep(0.05)
        assert stream_lines, "the event stream did not start"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/healthz", timeout=2)  # no longer accepting
        sock.sendall(body[20:])  # the rest of the request in flight
        sock.settimeout(10)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.1 201"), reply[:200]
        assert stream_ended.wait(5), "the event stream kept the server from draining"
        assert proc.wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert [r.name for r in store.list_runs()].count("in-flight") == 1
        assert not any(Path(f"/proc/{c}").exists() for c in children)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    """The server processes ``pid`` started (not multiprocessing's resource tracker)."""
    kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def test_metrics_add_up_every_server_process(tmp_path):
    """``serve --workers 2``: whichever process answers a scrape reports the requests both answered."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(make_engine(url))
    port = free_port()

    def served(base: str) -> float:
        text = httpx.get(base + "/metrics", timeout=5).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "ivon_diag_request_seconds_count" and s.labels["route"] == "/api/v1/runs")

    proc, base = start_server(["--db", url, "serve", "--port", str(port), "--workers", "2"], port, ENV)
    try:
        for _ in range(40):  # new connections: the kernel spreads them over both processes
            assert httpx.get(base + "/api/v1/runs", timeout=5).status_code == 200
        assert [served(base) for _ in range(6)] == [40.0] * 6
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_dead_server_process_stops_the_service(tmp_path):
    """``serve --workers 2``: a server process killed from outside takes the other down and the command exits 1
    naming it (for the orchestrator to restart the service whole), rather than serving at half strength."""
    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(make_engine(url))
    port = free_port()
    proc, base = start_server(["--db", url, "serve", "--port", str(port), "--workers", "2"], port, ENV)
    try:
        children = _children(proc.pid)
        assert len(children) == 2
        for _ in range(20):  # both answer from the one port
            assert httpx.get(base + "/healthz", timeout=5).status_code == 200
        os.kill(children[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        assert not Path(f"/proc/{children[1]}").exists() or \
            Path(f"/proc/{children[1]}/status").read_text().find("zombie") >= 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, says", [(["--workers", "0"], "--workers must be at least 1, not 0"),
                                        (["--workers", "-3"], "--workers must be at least 1, not -3"),
                                        (["--workers", "two"], "invalid int value: 'two'")])
def test_serve_refuses_a_bad_worker_count(tmp_path, args, says):
    out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", f"sqlite:///{tmp_path / 'd.db'}", "serve",
                          "--port", str(free_port()), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and says in out.stderr, out.stderr


def test_serve_with_workers_on_a_taken_port_names_it_and_starts_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", f"sqlite:///{tmp_path / 'd.db'}",
                              "serve", "--port", str(port), "--workers", "2"], capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 2 and f"port {port} on 127.0.0.1 is taken" in out.stderr, out.stderr


def test_the_served_socket_answers_without_waiting_for_delayed_acks():
    """asyncio sets TCP_NODELAY on an accepted connection only when the listening socket's proto is IPPROTO_TCP;
    without it every keep-alive response (headers and body written apart) waited ~40 ms for the client's ACK."""
    from ivon_diag.serve import bind

    sock = bind("127.0.0.1", 0)

    async def accepted_nodelay() -> int:
        loop = asyncio.get_running_loop()
        seen = loop.create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport):
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                               socket.TCP_NODELAY))
                transport.close()

        server = await loop.create_server(Accept, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
