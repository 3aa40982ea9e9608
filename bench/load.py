"""Load: workers training queued jobs while 50 clients read the API, on PostgreSQL (2 workers) and SQLite (1).

Reports requests, errors (5xx or transport), exceptions in the server's log, p50/p99 and whether every job ran
exactly once (goal: 0 errors, no lost or doubly-run job).

    python bench/load.py [--seconds 60] [--jobs 6]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.store import Store, make_engine, upgrade  # noqa: E402
from bench.api import free_port, hot_paths, load, start_server  # noqa: E402

JOB = {"data": {"name": "synthetic", "n_synthetic": 800}, "model": {"name": "mlp", "hidden": [64]}, "epochs": 8,
       "batch_size": 32, "eval_every": 20, "early_stopping": {"enabled": False}}


def scenario(url: str, workers: int, jobs: int, seconds: float, tmp: str) -> None:
    upgrade(make_engine(url))
    store = Store(url)
    runs = [store.create_run(f"load-{i}", {**JOB, "name": f"load-{i}", "seed": i}) for i in range(jobs)]
    port = free_port()
    server_log = open(f"{tmp}/server-{workers}.log", "w+")
    server = start_server(url, port, stderr=server_log)
    procs = [subprocess.Popen([sys.executable, "-m", "ivon_diag.cli", "--db", url, "worker", "--checkpoint-dir",
                               f"{tmp}/ck", "--lease", "30"], stdout=subprocess.DEVNULL) for _ in range(workers)]
    try:
        lat, errors = asyncio.run(load(f"http://127.0.0.1:{port}", hot_paths(runs[0].id), 50, seconds))
        deadline = time.time() + 600
        while time.time() < deadline and any(store.get_run(r.id).status not in ("done", "failed") for r in runs):
            time.sleep(1)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
        server.terminate()
        server.wait(timeout=10)
    server_log.seek(0)
    exceptions = server_log.read().count("Traceback")
    server_log.close()
    states = [store.get_run(r.id).status for r in runs]
    attempts = [store.get_job_for_run(r.id).attempts for r in runs]
    lat_ms = sorted(x * 1e3 for x in lat)
    q = statistics.quantiles(lat_ms, n=100)
    print(f"{store.dialect}, {workers} worker(s), {jobs} jobs, 50 clients for {seconds:.0f} s: {len(lat_ms)} requests, "
          f"errors {errors}, server exceptions {exceptions}, p50 {q[49]:.0f} ms, p99 {q[98]:.0f} ms; "
          f"jobs done {states.count('done')}/{jobs}, "
          f"attempts {attempts} (each job ran once: {all(a == 1 for a in attempts)})")
    store.engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    name = f"ivon_load_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        scenario(args.pg.rsplit("/", 1)[0] + "/" + name, 2, args.jobs, args.seconds, tmp)
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    scenario(f"sqlite:///{tmp}/load.db", 1, args.jobs, args.seconds, tmp)


if __name__ == "__main__":
    main()
