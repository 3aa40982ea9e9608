"""Benchmark the API and the dashboard.

1. p50/p99 latency of read endpoints under 50 concurrent clients on loopback while a worker process adds
   evaluations (goal: p99 <= 100 ms, no errors), for dashboards polling one run and for a mix with random
   examples, each without and with the API's read cache; the clients are wrk's (``bench/api_load.lua``, when wrk is
   installed) and Python's (httpx): on a small machine the Python clients take CPU the server would have had.
   Those clients send their next request as soon as an answer arrives (a closed loop without think time: a
   saturation test, whose latency is the queue, clients / throughput); a last line has 50 wrk clients each waiting
   ``POLL_MS`` between an answer and its next request, as dashboards and scripts that poll do;
2. time until the run page has drawn 5 curves of 10k points each in headless Chromium (goal: <= 1.5 s).

    python bench/api.py [--seconds 20] [--db sqlite:///...]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.store import Store, make_engine, upgrade  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str, port: int, cache_seconds: float = 1.0, stderr=None,
                 workers: int = 1) -> subprocess.Popen:
    """The API as a real process (``workers`` server processes); ``stderr``: a file for its log (server-side
    exceptions are counted from it)."""
    env = {**os.environ, "IVON_DIAG_CACHE_SECONDS": str(cache_seconds)}
    proc = subprocess.Popen([sys.executable, "-m", "ivon_diag.cli", "--db", db, "serve", "--port", str(port),
                             "--workers", str(workers)], env=env, stderr=stderr)
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def hot_paths(run_id: int):
    """What dashboards polling one run ask for."""
    paths = [f"/api/v1/runs/{run_id}", f"/api/v1/runs/{run_id}/metrics/loo",
             f"/api/v1/runs/{run_id}/examples?limit=50", f"/api/v1/runs/{run_id}/examples/7", "/api/v1/runs"]
    return lambda k, rng: paths[k % len(paths)]


def mixed_paths(run_id: int, n: int):
    """One request in five for a random example's history or a random page: a database read each time."""
    hot = hot_paths(run_id)

    def pick(k, rng):
        if k % 5:
            return hot(k, rng)
        if rng.random() < 0.5:
            return f"/api/v1/runs/{run_id}/examples/{rng.integers(n)}"
        return f"/api/v1/runs/{run_id}/examples?limit=50&offset={50 * rng.integers(n // 50)}"

    return pick


async def load(base: str, pick, clients: int, seconds: float) -> tuple[list[float], int]:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients)

    async def client(i: int) -> None:
        nonlocal errors
        rng = np.random.default_rng(i)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as c:
            k = i
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = await c.get(pick(k, rng))
                    if r.status_code >= 500:  # a 404 before the run's first evaluation is an answer, not an error
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                lat.append(time.perf_counter() - t)
                k += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return lat, errors


def writer(db: str, run_id: int, n: int) -> None:
    """A worker's writes, from its own process: an evaluation of n examples every 0.5 s."""
    store, rng, step = Store(db), np.random.default_rng(1), 1000
    while True:
        s = rng.random(n)
        store.write_evaluation(run_id, step, loo=0.1, metrics={"test_nll": 0.2}, idx=np.arange(n), scores=s)
        step += 10
        time.sleep(0.5)


WARMUP_SECONDS = 3.0
POLL_MS = 250  # a polling client's wait between a response and its next request: 50 of them offer <= 200 req/s


def served_within(base: str, seconds: float = 0.1) -> tuple[float, float]:
    """(requests the server answered within ``seconds`` by its own clock, requests), summed over the API's routes
    from its Prometheus histogram: the server's share of the latency, without the clients' queueing."""
    from prometheus_client.parser import text_string_to_metric_families

    within = total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for sample in family.samples:
            if not sample.labels.get("route", "").startswith("/api/"):
                continue
            if sample.name.endswith("_bucket") and float(sample.labels["le"]) == seconds:
                within += sample.value
            elif sample.name.endswith("_count"):
                total += sample.value
    return within, total


def load_wrk(base: str, run_id: int, n: int, mix: str, clients: int, seconds: float,
             think_ms: int = 0) -> tuple[float, float, int, int]:
    """(p50 ms, p99 ms, requests, errors) by wrk (C, one thread, ``clients`` connections each a closed loop: the same
    clients as ``load``'s without the Python clients' CPU, which on a small machine is taken from the server);
    ``think_ms``: each connection waits that long between a response and its next request."""
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(int(seconds), 1)}s", "--timeout", "10s", "-s",
                          str(Path(__file__).with_name("api_load.lua")), base, "--", str(run_id), str(n), mix,
                          str(think_ms)],
                         capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("wrk-result "))
    count, socket_errors, status_errors, p50, p99 = line.split()[1:]
    if int(socket_errors) or int(status_errors):  # which kind: the server's answers or the connections
        print(f"   (wrk: {socket_errors} socket errors: connect, read, write or timeout; {status_errors} answers "
              f"other than 2xx/3xx)", flush=True)
    return float(p50), float(p99), int(count), int(socket_errors) + int(status_errors)


def measure(db: str, run_id: int, n: int, mix: str, seconds: float, cache_seconds: float,
            client: str, workers: int = 1, think_ms: int = 0) -> tuple[float, float, int, int, float]:
    """(p50 ms, p99 ms, requests, errors, share the server answered within 100 ms) of 50 clients of ``client``
    ("wrk" or "python") for ``mix`` ("hot" or "mixed") against a fresh server; ``think_ms`` (wrk only): each
    client's wait between a response and its next request."""
    port = free_port()
    proc = start_server(db, port, cache_seconds, workers=workers)
    base = f"http://127.0.0.1:{port}"
    pick = hot_paths(run_id) if mix == "hot" else mixed_paths(run_id, n)

    def run(secs: float) -> tuple[float, float, int, int]:
        if client == "wrk":
            return load_wrk(base, run_id, n, mix, 50, secs, think_ms)
        lat, errors = asyncio.run(load(base, pick, 50, secs))
        q = statistics.quantiles(sorted(x * 1e3 for x in lat), n=100)
        return q[49], q[98], len(lat), errors

    try:  # a fresh server's first seconds (imports, cold caches, connections) are not its steady state
        run(WARMUP_SECONDS)
        w0, n0 = served_within(base)
        p50, p99, count, errors = run(seconds)
        w1, n1 = served_within(base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return p50, p99, count, errors, (w1 - w0) / max(n1 - n0, 1)


def one_client(db: str, run_id: int, requests: int = 250) -> tuple[float, float]:
    """(p50 ms, p99 ms) of one client sending the hot paths one after another on one kept-alive connection (a
    dashboard tab polling), the cache off: what a request costs without a queue, and what the connection adds."""
    port = free_port()
    proc = start_server(db, port, 0.0)
    pick, lat = hot_paths(run_id), []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for k in range(requests + 25):
                t = time.perf_counter()
                c.get(pick(k, None)).raise_for_status()
                if k >= 25:  # the first requests warm the server up
                    lat.append((time.perf_counter() - t) * 1e3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    q = statistics.quantiles(sorted(lat), n=100)
    return q[49], q[98]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--db", default=None)
    ap.add_argument("--workers", type=int, default=1, help="server processes (ivon-diag serve --workers)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    db = args.db or f"sqlite:///{tmp}/api.db"
    upgrade(make_engine(db))
    store = Store(db)
    n = 10_000
    run = store.create_run("bench", enqueue=False)
    store.add_examples(run.id, range(n), labels=[i % 10 for i in range(n)])
    rng = np.random.default_rng(0)
    for step in range(1, 11):
        s = rng.random(n)
        store.write_evaluation(run.id, step * 10, loo=1 / step, metrics={"test_nll": 1 / step}, idx=np.arange(n),
                               scores=s, loo_losses=s, prob_label=1 - s)
    w = multiprocessing.get_context("spawn").Process(target=writer, args=(db, run.id, n), daemon=True)
    w.start()
    print(f"1. 50 closed-loop clients (no think time) for {args.seconds:.0f} s per line (after "
          f"{WARMUP_SECONDS:.0f} s of warm-up) on {store.dialect}, {args.workers} server process(es), a worker "
          f"process writing an evaluation of {n // 1000}k examples every 0.5 s   (goal: p99 <= 100 ms, 0 errors; "
          f"server-side: the time from the request's arrival in the app to its response, by the server's own "
          f"histogram, without the clients' queue)")
    p50, p99 = one_client(db, run.id)
    print(f"   one client, requests one after another on one kept-alive connection, no cache: p50 {p50:.1f} ms  "
          f"p99 {p99:.1f} ms")
    clients = (["wrk"] if shutil.which("wrk") else []) + ["python"]
    if clients[0] != "wrk":
        print("   (wrk is not installed: apt-get install wrk; the Python clients share the server's CPU)")
    try:
        for label, mix in (("hot: 5 reads of one run", "hot"), ("mixed: 1 in 5 a random example or page", "mixed")):
            for client in clients:
                base = measure(db, run.id, n, mix, args.seconds, 0.0, client, args.workers)
                cached = measure(db, run.id, n, mix, args.seconds, 1.0, client, args.workers)
                for name, (p50, p99, count, errors, served) in (("no cache", base), ("1 s cache (default)", cached)):
                    print(f"   {label:40s} {client:6s} {name:20s} {count / args.seconds:7.0f} req/s  "
                          f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  errors {errors}  "
                          f"server-side within 100 ms {served:6.2%}")
                print(f"   {label:40s} {client:6s} p99 ratio no cache / default: {base[1] / cached[1]:.1f}x")
        if clients[0] == "wrk":  # dashboards and scripts that wait between requests, instead of a saturating loop
            p50, p99, count, errors, served = measure(db, run.id, n, "mixed", args.seconds, 1.0, "wrk",
                                                      args.workers, POLL_MS)
            print(f"   {'mixed, each client waiting ' + str(POLL_MS) + ' ms':40s} wrk    1 s cache (default)  "
                  f"{count / args.seconds:7.0f} req/s  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  errors {errors}  "
                  f"server-side within 100 ms {served:6.2%}")
    finally:
        w.terminate()
        w.join()
    port = free_port()
    proc = start_server(db, port)
    base = f"http://127.0.0.1:{port}"

    chromium = shutil.which("chromium")
    if chromium:
        from playwright.sync_api import sync_playwright

        big = store.create_run("curves", enqueue=False)
        steps = list(range(10_000))
        for name in ("train_nll", "test_nll", "loo", "test_accuracy", "test_ece"):
            store.log_metrics(big.id, name, steps, np.sin(np.arange(10_000) / 100).tolist())
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page()
            page.goto(f"{base}/runs/{big.id}")  # warm caches (plotly.js)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                page.goto(f"{base}/runs/{big.id}")
                page.wait_for_function("document.querySelectorAll('#loss .scatterlayer .trace').length === 3 && "
                                       "document.querySelectorAll('#quality .scatterlayer .trace').length === 2")
                times.append(time.perf_counter() - t)
            browser.close()
        print(f"2. run page with 5 curves of 10k points (downsampled by the server to <= 2,000 each): drawn in "
              f"{statistics.median(times):.2f} s (median of 5)   (goal <= 1.5 s)")
    proc.terminate()
    proc.wait(timeout=10)


if __name__ == "__main__":
    main()
