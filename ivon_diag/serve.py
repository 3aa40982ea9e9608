"""``ivon-diag serve``: the API and the dashboard, in one process or in several sharing one listening socket.

One Python process answers on about one core (the interpreter's lock), so ``--workers N`` starts N server processes
that accept from the same socket, bound once here; the kernel spreads connections between them. Each process has
its own read cache and connection pool; ``/metrics`` adds up their latency histograms (prometheus_client's
multiprocess mode). On SIGTERM or SIGINT every process drains (stops accepting, lets requests in flight finish, ends
live event streams) within ``--graceful-seconds``. A process that dies takes the others down with it and the command
exits 1, for the orchestrator (compose, systemd, Kubernetes) to restart the service whole.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import uvicorn

from app.main import create_app
from app.settings import Settings
from app.store import Store, ensure_current


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or ValueError naming the port when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY on accepted sockets only when their proto is IPPROTO_TCP, and without
    # it a keep-alive response written in two parts waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"port {port} on {host} is taken ({err.strerror}): is another `ivon-diag serve` or demo "
                         f"running? Open its page, or give this one another --port") from None
    sock.listen(2048)
    return sock


def serve_process(db: str | None, graceful_seconds: float, sock: socket.socket) -> None:
    """One server process on ``sock``: the app over the store at ``db`` (None: the settings' default)."""
    settings = Settings(db=db) if db else Settings()
    store = Store(settings.db)
    ensure_current(store.engine)
    app = create_app(settings, store)

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: stop accepting, let requests in flight finish, end live event streams (clients
        reconnect elsewhere), and give up on stragglers after ``graceful_seconds``."""

        def handle_exit(self, sig, frame):
            app.state.draining.set()
            super().handle_exit(sig, frame)

    # what start-up made lives as long as the process: out of the collector's sight, a full collection under load
    # scans what requests made, not the whole app, and pauses every request in flight that much shorter
    gc.freeze()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_seconds)
    DrainingServer(config).run(sockets=[sock])


def serve(db: str | None, host: str, port: int, graceful_seconds: float, workers: int = 1) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (1 when a server process died on its own)."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, not {workers}")
    sock = bind(host, port)
    if workers == 1:
        serve_process(db, graceful_seconds, sock)
        return 0
    metrics_dir = tempfile.mkdtemp(prefix="ivon-diag-metrics-")  # the processes' shared Prometheus histograms
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client as each child imports it
    try:
        return _supervise(db, graceful_seconds, sock, workers)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(db: str | None, graceful_seconds: float, sock: socket.socket, workers: int) -> int:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no torch or threads inherited
    procs = [ctx.Process(target=serve_process, args=(db, graceful_seconds, sock), name=f"ivon-diag-serve-{i}")
             for i in range(workers)]
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stopping.append(s))
    for p in procs:
        p.start()
    sock.close()  # the children hold it
    status = 0
    while not stopping:
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            print(f"ivon-diag serve: server process {dead[0].pid} exited ({dead[0].exitcode}); stopping the others",
                  file=sys.stderr)
            status = 1
            break
        time.sleep(0.2)
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: each drains within graceful_seconds
    deadline = time.monotonic() + graceful_seconds + 5
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
        if p.is_alive():
            p.kill()
            p.join()
    return status
