import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

# What workers started by the tests may read and import (worker.access): the temporary folders tests write their
# data in, and the tests' own factory modules. Tests of the refusals set narrower values.
os.environ.setdefault("IVON_DIAG_DATA_ROOTS", tempfile.gettempdir())
os.environ.setdefault("IVON_DIAG_FACTORY_MODULES", "userfactory,onerank,crashfactory")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


import contextlib  # noqa: E402
import uuid  # noqa: E402

PG_ADMIN = os.environ.get("IVON_DIAG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_admin():
    import psycopg

    return psycopg.connect(PG_ADMIN.replace("postgresql+psycopg", "postgresql"), autocommit=True, connect_timeout=5)


def new_pg_database() -> str:
    """A fresh, empty PostgreSQL database; returns its URL."""
    name = f"ivon_test_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url():
    url = new_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path_factory):
    """A migrated database on each backend: a SQLite file, and the session's PostgreSQL database."""
    from app.store import make_engine, upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'store.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def store(store_url):
    from app.store import Store

    s = Store(store_url)
    yield s
    s.engine.dispose()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cli_args: list[str], port: int, env: dict | None = None):
    """Start ``ivon-diag <cli_args>`` (a server on ``port``) as a real process; return it and its base URL once it
    answers."""
    import subprocess
    import sys
    import time

    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "ivon_diag.cli", *cli_args], env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(base + "/healthz", timeout=1)
            return proc, base
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.terminate()
    proc.wait(timeout=10)
    raise RuntimeError(f"server {cli_args} did not answer on port {port}")


@contextlib.contextmanager
def serving(cli_args: list[str], port: int, env: dict | None = None):
    """``start_server`` as a context: the server is terminated on exit; yields its base URL."""
    proc, base = start_server(cli_args, port, env)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def receiver():
    """A local HTTP endpoint: fails the first `fail_first` requests with 503, records the others."""
    state = {"fail_first": 0, "seen": 0, "got": [], "delay": 0.0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state["seen"] += 1
            time.sleep(state["delay"])
            if state["seen"] <= state["fail_first"]:
                self.send_response(503)
                self.end_headers()
                return
            state["got"].append((self.headers["X-Ivon-Diag-Signature"], body))
            state.setdefault("hosts", []).append(self.headers["Host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", state
    server.shutdown()
