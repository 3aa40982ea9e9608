"""Hooks: signed webhooks delivered in the background with retries; callbacks; refused targets."""

import hashlib
import hmac
import json
import time

import pytest

from app.store import Store, make_engine, upgrade
from app.store.urls import allowed_networks
from worker.hooks import EVENTS, HookDispatcher, check_url
from worker.service import run_job


def test_webhook_is_signed_and_retried_with_backoff(receiver):
    url, state = receiver
    state["fail_first"] = 2
    hooks = HookDispatcher([(url, ["evaluation"], "s3cret")], backoff=0.05, allow="127.0.0.1")
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
    hooks = HookDispatcher([(url, ["evaluation"], "k")], allow="127.0.0.1")
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
    check_url("http://169.254.169.254/x", allow=allowed_networks("169.254.0.0/16"))
    with pytest.raises(ValueError, match="http"):
        check_url("file:///etc/passwd")
    assert HookDispatcher([("http://169.254.169.254/", ["failed"], "k")]).webhooks == []


def test_a_failing_callback_does_not_stop_the_job_and_events_arrive(tmp_path, receiver, monkeypatch):
    url, state = receiver
    monkeypatch.setenv("IVON_DIAG_WEBHOOK_ALLOW", "127.0.0.1/32")
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


REFUSED = ["http://[::ffff:169.254.169.254]/", "http://[::ffff:a9fe:a9fe]/", "http://169.254.169.254/latest",
           "http://127.0.0.1/", "http://localhost:8000/", "http://2130706433/", "http://0.0.0.0/", "http://10.0.0.1/",
           "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/", "http://192.0.0.192/", "http://[::1]/",
           "http://[fc00::1]/", "http://[fe80::1]/", "http://[2002:a9fe:a9fe::]/", "http://[64:ff9b::a9fe:a9fe]/",
           "http://[::169.254.169.254]/", "http://[2001:0:4136:e378:8000:63bf:5601:5601]/", "http://224.0.0.1/",
           "http://198.18.0.1/", "http://user:pw@93.184.215.14/", "ftp://93.184.215.14/", "http://[::ffff:7f00:1]/"]


def test_registration_refuses_every_internal_target_and_stores_nothing(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    monkeypatch.delenv("IVON_DIAG_WEBHOOK_ALLOW", raising=False)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    client = TestClient(create_app(Settings(db=url), store))
    auth = {"Authorization": f"Bearer {store.create_token('t')}"}
    for target in REFUSED:
        r = client.post("/api/v1/hooks", json={"url": target, "events": ["finished"]}, headers=auth)
        assert r.status_code == 422 and any(w in r.text for w in ("refused", "credentials", "pattern")), target
    assert store.hooks_for(None) == []
    for target in ("http://93.184.215.14/x", "https://[2606:4700::1111]/hook"):
        r = client.post("/api/v1/hooks", json={"url": target, "events": ["finished"]}, headers=auth)
        assert r.status_code == 201, target
    monkeypatch.setenv("IVON_DIAG_WEBHOOK_ALLOW", "10.0.0.0/8")  # the operator admits an internal network
    assert client.post("/api/v1/hooks", json={"url": "http://10.1.2.3/", "events": ["failed"]},
                       headers=auth).status_code == 201
    assert client.post("/api/v1/hooks", json={"url": "http://192.168.1.1/", "events": ["failed"]},
                       headers=auth).status_code == 422


def test_a_name_that_rebinds_is_checked_again_at_every_connect(receiver, monkeypatch):
    """The check and the connect use one resolution: the request goes to the checked address with the name as Host."""
    import socket

    url, state = receiver
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    answer = {"ip": "127.0.0.1"}
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.create_connection
    connects = []

    def fake_getaddrinfo(host, *args, **kwargs):
        if host == "hooks.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer["ip"], port))]
        return real_getaddrinfo(host, *args, **kwargs)

    def recording_connect(address, *args, **kwargs):
        connects.append(address[0])
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", recording_connect)
    hooks = HookDispatcher([(f"http://hooks.test:{port}/hook", ["evaluation"], "k")], allow="127.0.0.1",
                           backoff=0.01)
    hooks.emit("evaluation", {"step": 1})
    deadline = time.time() + 10
    while time.time() < deadline and not state["got"]:
        time.sleep(0.02)
    answer["ip"] = "169.254.169.254"  # the name now points at the metadata service
    hooks.emit("evaluation", {"step": 2})
    hooks.close(timeout=5)
    assert [json.loads(b)["step"] for _, b in state["got"]] == [1] and state["hosts"] == [f"hooks.test:{port}"]
    assert connects and set(connects) == {"127.0.0.1"}  # never a connect to the rebound address
    assert hooks.delivered == 1 and hooks.failed == 1


def test_a_dead_hook_never_costs_a_healthy_one_its_events(receiver):
    """Before: one unreachable hook's retries (7.5 s an event) outran close() and the healthy hook lost `finished`."""
    import socket

    url, state = receiver
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    hooks = HookDispatcher([(dead, list(EVENTS), "a"), (url, list(EVENTS), "b")], allow="127.0.0.1")
    for step in range(4):
        hooks.emit("evaluation", {"step": step})
    hooks.emit("finished", {"status": "done"})
    t = time.perf_counter()
    hooks.close(timeout=3)
    assert time.perf_counter() - t < 4
    assert [json.loads(b)["event"] for _, b in state["got"]] == ["evaluation"] * 4 + ["finished"]
    assert hooks.delivered == 5 and hooks.failed == 5  # the dead hook's five, counted, not silently lost
