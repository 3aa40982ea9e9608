"""Benchmark the API and the dashboard.

1. p50/p99 latency of read endpoints under 50 concurrent clients on loopback while a writer adds evaluations
   (goal: p99 <= 100 ms, no errors);
2. time until the run page has drawn 5 curves of 10k points each in headless Chromium (goal: <= 1.5 s).

    python bench/api.py [--seconds 20] [--db sqlite:///...]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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


def start_server(db: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "--db", db, "serve", "--port", str(port)])
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


async def load(base: str, run_id: int, clients: int, seconds: float) -> tuple[list[float], int]:
    paths = [f"/api/v1/runs/{run_id}", f"/api/v1/runs/{run_id}/metrics/loo",
             f"/api/v1/runs/{run_id}/examples?limit=50", f"/api/v1/runs/{run_id}/examples/7", "/api/v1/runs"]
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients)

    async def client(i: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as c:
            k = i
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = await c.get(paths[k % len(paths)])
                    if r.status_code >= 500:  # a 404 before the run's first evaluation is an answer, not an error
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                lat.append(time.perf_counter() - t)
                k += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return lat, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--db", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    db = args.db or f"sqlite:///{tmp}/api.db"
    upgrade(make_engine(db))
    store = Store(db)
    run = store.create_run("bench", enqueue=False)
    store.add_examples(run.id, range(10_000), labels=[i % 10 for i in range(10_000)])
    rng = np.random.default_rng(0)
    for step in range(1, 11):
        s = rng.random(10_000)
        store.write_evaluation(run.id, step * 10, loo=1 / step, metrics={"test_nll": 1 / step}, idx=np.arange(10_000),
                               scores=s, loo_losses=s, prob_label=1 - s)
    port = free_port()
    proc = start_server(db, port)
    base = f"http://127.0.0.1:{port}"
    writing = threading.Event()

    def writer() -> None:  # a worker writing evaluations meanwhile
        step = 1000
        while not writing.is_set():
            s = rng.random(10_000)
            store.write_evaluation(run.id, step, loo=0.1, metrics={"test_nll": 0.2}, idx=np.arange(10_000), scores=s)
            step += 10
            time.sleep(0.5)

    w = threading.Thread(target=writer)
    w.start()
    try:
        lat, errors = asyncio.run(load(base, run.id, 50, args.seconds))
    finally:
        writing.set()
        w.join()
    lat_ms = sorted(x * 1e3 for x in lat)
    q = statistics.quantiles(lat_ms, n=100)
    print(f"1. {len(lat_ms)} requests from 50 clients in {args.seconds:.0f} s on {store.dialect}, a writer adding "
          f"evaluations of 10k examples: p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms, errors {errors}   "
          "(goal: p99 <= 100 ms, 0 errors)")

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
