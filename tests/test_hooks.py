"""Hooks: signed webhooks delivered in the background with retries; callbacks; refused targets."""

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.store import Store, make_engine, upgrade
from worker.hooks import SIGNATURE_HEADER, HookDispatcher, check_url
from worker.service import run_job


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
            state["got"].append((self.headers[SIGNATURE_HEADER], body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", state
    server.shutdown()


def test_webhook_is_signed_and_retried_with_backoff(receiver):
    url, state = receiver
    state["fail_first"] = 2
    hooks = HookDispatcher([(url, ["evaluation"], "s3cret")], backoff=0.05)
    hooks.emit("evaluation", {"run_id": 1, "step": 10, "loo": 0.3})
    hooks.emit("finished", {"run_id": 1})  # not subscribed
    hooks.close()
    assert state["seen"] == 3 and len(state["got"]) == 1
    sig, body = state["got"][0]
    assert sig == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert json.loads(body) == {"event": "evaluation", "run_id": 1, "step": 10, "loo": 0.3}


def test_slow_webhook_never_blocks_the_caller(receiver):
    url, state = receiver
    state["delay"] = 1.0
    hooks = HookDispatcher([(url, ["evaluation"], "k")])
    t = time.perf_counter()
    for step in range(5):
        hooks.emit("evaluation", {"step": step})
    assert time.perf_counter() - t < 0.5
    hooks.close(timeout=15)
    assert len(state["got"]) == 5


def test_link_local_and_metadata_targets_are_refused():
    for url in ("http://169.254.169.254/latest/meta-data", "http://[fe80::1]/x", "http://metadata.google.internal/"):
        with pytest.raises(ValueError, match="refused"):
            check_url(url)
    check_url("http://169.254.169.254/x", allow_link_local=True)
    with pytest.raises(ValueError, match="http"):
        check_url("file:///etc/passwd")
    assert HookDispatcher([("http://169.254.169.254/", ["failed"], "k")]).webhooks == []


def test_a_failing_callback_does_not_stop_the_job_and_events_arrive(tmp_path, receiver):
    url, state = receiver
    db = f"sqlite:///{tmp_path / 'h.db'}"
    upgrade(make_engine(db))
    store = Store(db)
    run = store.create_run("hooks", {"name": "hooks", "data": {"name": "synthetic", "n_synthetic": 120},
                                     "model": {"name": "logreg"}, "epochs": 2, "eval_every": 3,
                                     "early_stopping": {"enabled": False}}, enqueue=False)
    store.add_hook(url, ["evaluation", "finished", "failed"], run_id=run.id, secret="k")
    seen = []

    def bad_callback(event, payload):
        seen.append(event)
        raise RuntimeError("user bug")

    assert run_job(store, run.id, tmp_path / "ck", callbacks=[bad_callback], log=lambda *_: None) == "done"
    events = [json.loads(b)["event"] for _, b in state["got"]]
    assert events.count("evaluation") == len(store.evaluations(run.id)) and events[-1] == "finished"
    assert seen == events
