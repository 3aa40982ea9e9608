"""Benchmark a job's peak memory with its npz held in memory against the same npz memory-mapped
(``data.memory_map``), each job in a process of its own, in one run.

    python bench/memory.py [--n 50000] [--epochs 1]

The data: CIFAR-shaped synthetic images (3×32×32 float32, 10 classes) with a test split of a fifth of N, written
uncompressed to a temporary npz. Printed per path: the job's wall time, peak anonymous memory (the process's own
pages: what memory pressure cannot drop) and peak resident memory (with the file's pages the mapping has read,
which the kernel drops under pressure), and the ratios mapped / in memory; a third job on 1,000 images measures what
does not grow with N, so the next line compares what does; the last, how much of that a process importing torch
holds before it does anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SMALL = 1000  # a job this small measures the memory that does not grow with N

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
peak = {"anon": 0, "rss": 0}

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out

def sample():
    while True:
        s = status()
        peak["anon"] = max(peak["anon"], s.get("RssAnon", 0))
        peak["rss"] = max(peak["rss"], s.get("VmRSS", 0))
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
from worker.allocator import keep_heap
keep_heap()  # as `ivon-diag train` does
from app.store import Store, make_engine, upgrade
from worker.config import parse_config
from worker.trainer import Trainer
job = json.loads(sys.argv[2])
url = "sqlite:///" + sys.argv[3]
upgrade(make_engine(url))
store = Store(url)
cfg = parse_config(job)
run = store.create_run("memory", cfg.model_dump(mode="json"))
t = time.perf_counter()
Trainer(cfg, store, run.id, sys.argv[4], run.uid, log=lambda *a, **k: None).run()
seconds = time.perf_counter() - t
time.sleep(0.05)
print(json.dumps({**peak, "seconds": seconds}))
"""


FLOOR = r"""
import torch
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon")))
"""


def images(path: Path, n: int, seed: int = 0) -> None:
    g = np.random.default_rng(seed)
    templates = g.normal(size=(10, 3, 8, 8)).astype(np.float32)

    def part(m):
        y = g.integers(0, 10, size=m)
        x = np.repeat(np.repeat(templates[y], 4, axis=2), 4, axis=3)
        x += g.normal(scale=1.3, size=x.shape).astype(np.float32)
        return x, y

    x, y = part(n)
    xt, yt = part(n // 5)
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images(root / "images.npz", args.n)
        images(root / "small.npz", SMALL)
        size = (root / "images.npz").stat().st_size
        env = {**os.environ, "IVON_DIAG_DATA_ROOTS": str(root), "OMP_NUM_THREADS": "2"}
        out = {}
        for key, name, mapped in (("in memory", "images", False), ("memory-mapped", "images", True),
                                  (f"N={SMALL} mapped", "small", True)):
            job = {"data": {"name": "npz", "path": str(root / f"{name}.npz"), "memory_map": mapped},
                   "model": {"name": "cnn"}, "epochs": args.epochs, "early_stopping": {"enabled": False}}
            done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps(job),
                                   str(root / f"{name}{mapped}.db"), str(root / "ck")], env=env, capture_output=True,
                                  text=True, timeout=3600)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            out[key] = json.loads(done.stdout.strip().splitlines()[-1])
            mib = {k: v / 2**20 for k, v in out[key].items() if k != "seconds"}
            print(f"{key:>15}: {out[key]['seconds']:.1f} s, peak anonymous {mib['anon']:.0f} MiB, peak resident "
                  f"{mib['rss']:.0f} MiB")
        a, b, c = out["in memory"], out["memory-mapped"], out[f"N={SMALL} mapped"]
        print(f"N={args.n} ({size / 2**20:.0f} MiB npz), {args.epochs} epoch(s), small CNN, defaults: mapped / in "
              f"memory: peak anonymous {b['anon'] / a['anon']:.2f}x, peak resident {b['rss'] / a['rss']:.2f}x, "
              f"wall {b['seconds'] / a['seconds']:.2f}x")
        grow_a, grow_b = (a["anon"] - c["anon"]) / 2**20, (b["anon"] - c["anon"]) / 2**20
        print(f"what grows with N (peak anonymous above the N={SMALL} job's, the process's own: torch, the store, the "
              f"passes' work space): in memory {grow_a:.0f} MiB, mapped {grow_b:.0f} MiB ({grow_b / grow_a:.2f}x)")
        done = subprocess.run([sys.executable, "-c", FLOOR], env=env, capture_output=True, text=True, timeout=600)
        floor = int(done.stdout.split()[-1]) / 2**20
        print(f"of the N={SMALL} job's {c['anon'] / 2**20:.0f} MiB, a process that only imports torch holds "
              f"{floor:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
