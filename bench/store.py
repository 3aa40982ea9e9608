"""Benchmark the store on SQLite and PostgreSQL.

Prints, per backend: ingest of one evaluation of N_BIG per-example rows, and of a second one (which folds the first
into each example's running mean LOO loss: its ratio to the first); p50/p95 of the top-50 query (by the score and by
the running mean), of a deep page by the mean (sorts the whole evaluation) and of one example's history with 100
evaluations stored (N_HIST examples each); a 100k-point curve downsampled to 2,000.
Goals: ingest <= 3 s; queries p95 <= 20 ms (the deep page by the mean excepted: O(N)).

    python bench/store.py [--quick] [--pg URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.store import Store, make_engine, upgrade  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else xs[0]


def bench(url: str, n_big: int, n_hist: int, evals: int, repeats: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    store = Store(engine)
    rng = np.random.default_rng(0)
    run = store.create_run("bench", enqueue=False)
    s = rng.random(n_big)
    t = time.perf_counter()
    store.write_evaluation(run.id, 0, loo=0.1, metrics={"train_nll": 0.1}, idx=np.arange(n_big), scores=s,
                           loo_losses=s, prob_label=s)
    ingest = time.perf_counter() - t
    t = time.perf_counter()
    store.write_evaluation(run.id, 1, loo=0.1, metrics={"train_nll": 0.1}, idx=np.arange(n_big), scores=s,
                           loo_losses=s[::-1].copy(), prob_label=s)
    ingest2 = time.perf_counter() - t

    hist_run = store.create_run("bench-history", enqueue=False)
    for step in range(evals):
        s = rng.random(n_hist)
        store.write_evaluation(hist_run.id, step * 100, loo=0.1, metrics={"train_nll": 0.1},
                               idx=np.arange(n_hist), scores=s, loo_losses=s, prob_label=s)
    store.log_metrics(hist_run.id, "curve", list(range(100_000)), np.sin(np.arange(100_000) / 300).tolist())
    if store.dialect == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")

    def timed(fn) -> list[float]:
        fn()
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
        return out

    top = timed(lambda: store.examples_at(run.id, step=0, k=50))
    top_mean = timed(lambda: store.examples_at(run.id, step=1, k=50, by="loo_mean"))
    deep_mean = timed(lambda: store.examples_at(run.id, step=1, k=50, offset=n_big // 2, by="loo_mean"))
    top_hist = timed(lambda: store.examples_at(hist_run.id, k=50))
    ex = rng.integers(0, n_hist, size=repeats + 1)
    it = iter(ex)
    hist = timed(lambda: store.example_history(hist_run.id, int(next(it))))
    curve = timed(lambda: store.curve(hist_run.id, "curve", max_points=2000))
    print(f"{store.dialect}:")
    print(f"   ingest of one evaluation, {n_big:,} examples: {ingest:.2f} s   (goal <= 3 s)")
    print(f"   ingest of a second, with running means:        {ingest2:.2f} s   ({ingest2 / ingest:.2f}x the first)")
    for name, xs in ((f"top-50 at a {n_big:,}-example step", top), ("top-50 by the running mean", top_mean),
                     ("a page at rank N/2 by the running mean", deep_mean),
                     (f"top-50, {evals} evaluations stored", top_hist),
                     (f"one example's history ({evals} evaluations of {n_hist:,})", hist),
                     ("100k-point curve -> 2,000", curve)):
        goal = "O(N): no goal" if "N/2" in name else "goal p95 <= 20 ms"
        print(f"   {name:48s} p50 {pct(xs, 50):6.1f} ms   p95 {pct(xs, 95):6.1f} ms   ({goal})")
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="an admin URL: the benchmark creates and drops its own database")
    args = ap.parse_args()
    n_big = 100_000 if args.quick else 1_000_000
    n_hist, evals, repeats = (10_000, 20, 20) if args.quick else (100_000, 100, 100)
    print(f"N = {n_big:,} for ingest; history with {evals} evaluations of {n_hist:,} examples "
          "(100 × 1M would take ~5 GB of disk per backend)")
    with tempfile.TemporaryDirectory() as tmp:
        bench(f"sqlite:///{tmp}/bench.db", n_big, n_hist, evals, repeats)
    import psycopg

    name = f"ivon_bench_{uuid.uuid4().hex[:8]}"
    admin = args.pg
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        bench(admin.rsplit("/", 1)[0] + "/" + name, n_big, n_hist, evals, repeats)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
