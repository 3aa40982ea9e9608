"""The API's read cache: bounded staleness, emptied by writes, per token, one database read per key at a time."""

import asyncio
import time

import httpx
import numpy as np
from fastapi.testclient import TestClient

from app.cache import ResponseCache
from app.main import create_app
from app.settings import Settings


def test_staleness_is_bounded_by_the_ttl(store):
    run = store.create_run("r", enqueue=False)
    client = TestClient(create_app(Settings(cache_seconds=0.5), store))
    assert client.get(f"/api/v1/runs/{run.id}").json()["status"] == "queued"
    store.set_run_status(run.id, "running")  # a worker's write, from another process in production
    assert client.get(f"/api/v1/runs/{run.id}").json()["status"] == "queued"  # served from memory
    time.sleep(0.6)
    assert client.get(f"/api/v1/runs/{run.id}").json()["status"] == "running"
    uncached = TestClient(create_app(Settings(cache_seconds=0), store))
    store.set_run_status(run.id, "done")
    assert uncached.get(f"/api/v1/runs/{run.id}").json()["status"] == "done"


def test_a_write_through_the_api_empties_the_cache_and_errors_are_not_kept(store):
    run = store.create_run("r", enqueue=False)
    token = store.create_token("cache-writer")
    client = TestClient(create_app(Settings(cache_seconds=60), store))
    assert client.get(f"/api/v1/runs/{run.id}").json()["stop_requested"] is False
    r = client.post(f"/api/v1/runs/{run.id}/stop", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    assert client.get(f"/api/v1/runs/{run.id}").json()["stop_requested"] is True
    assert client.get(f"/api/v1/runs/{run.id}/examples").status_code == 404  # no evaluation yet: not cached
    store.add_examples(run.id, range(5), labels=[0] * 5)
    store.write_evaluation(run.id, 1, loo=0.1, metrics={}, idx=np.arange(5), scores=np.arange(5.0))
    assert client.get(f"/api/v1/runs/{run.id}/examples").status_code == 200


def test_an_answer_for_one_token_is_never_served_without_it(store):
    store.create_run("r", enqueue=False)
    token = store.create_token("cache-reader")
    client = TestClient(create_app(Settings(read_requires_token=True, cache_seconds=60), store))
    assert client.get("/api/v1/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/api/v1/runs").status_code == 401
    assert client.get("/api/v1/runs", headers={"Authorization": "Bearer wrong"}).status_code == 403


def test_concurrent_misses_make_one_database_read_and_hits_are_measured(store):
    run = store.create_run("r", enqueue=False)
    app = create_app(Settings(cache_seconds=60), store)
    answers, calls = _concurrent_gets(app, store, "get_run", 0.2, f"/api/v1/runs/{run.id}", 20)
    assert [a.status_code for a in answers] == [200] * 20 and len({a.text for a in answers}) == 1
    assert len(calls) == 1
    metrics = TestClient(app).get("/metrics").text
    assert 'ivon_diag_request_seconds_count{method="GET",route="/api/v1/runs/{run_id}",status="200"} 20.0' in metrics


def test_entries_and_sizes_are_bounded():
    async def app(scope, receive, send):
        body = b"x" * (10 if scope["path"] != "/api/v1/big" else 100)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    cache = ResponseCache(app, ttl=60, max_entries=2, max_body=50)

    async def get(path):
        scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": []}
        sent = []

        async def send(m):
            sent.append(m)

        await cache(scope, None, send)
        return sent

    async def go():
        for p in ("/api/v1/a", "/api/v1/b", "/api/v1/c", "/api/v1/big"):
            assert (await get(p))[-1]["body"]
        return list(cache.entries)

    keys = asyncio.run(go())
    assert [k[0] for k in keys] == ["/api/v1/b", "/api/v1/c"]  # oldest evicted; the big answer not kept


def test_concurrent_requests_for_an_uncacheable_answer_all_get_it(store):
    """Many clients asking for a run's examples before its first evaluation: every one gets the 404, none a 500
    (found by bench/load.py)."""
    run = store.create_run("r", enqueue=False)
    app = create_app(Settings(cache_seconds=60), store)
    answers, _ = _concurrent_gets(app, store, "examples_at", 0.05, f"/api/v1/runs/{run.id}/examples", 30)
    assert [a.status_code for a in answers] == [404] * 30


def _concurrent_gets(app, store, method: str, delay: float, path: str, n: int) -> tuple[list, list]:
    """``n`` simultaneous GETs of ``path`` while ``store.<method>`` is slowed by ``delay`` s; returns the answers
    and the arguments of each store call. An exception in the app fails the caller's test."""
    calls, original = [], getattr(store, method)

    def slow(*a, **k):
        calls.append(a)
        time.sleep(delay)
        return original(*a, **k)

    async def many():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.gather(*(c.get(path) for _ in range(n)))

    setattr(store, method, slow)
    try:
        return asyncio.run(many()), calls
    finally:
        setattr(store, method, original)
