"""A training process holds only what training needs: a job on image data imports neither scipy nor torch's
compiler stack (dynamo, sympy), each tens of MiB a process keeps to its end (bench/memory.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

HEAVY = ("scipy", "torch._dynamo", "sympy")

CHILD = """
import json, sys
from app.store import Store, make_engine, upgrade
from worker.config import parse_config
from worker.trainer import Trainer
url = "sqlite:///" + sys.argv[2]
upgrade(make_engine(url))
store = Store(url)
cfg = parse_config(json.loads(sys.argv[1]))
run = store.create_run("lean", cfg.model_dump(mode="json"))
status = Trainer(cfg, store, run.id, sys.argv[3], run.uid, log=lambda *a, **k: None).run()
heavy = [h for h in sys.argv[4].split(",") if any(m == h or m.startswith(h + ".") for m in sys.modules)]
print(json.dumps({"status": status, "evaluations": len(store.evaluations(run.id)), "heavy": heavy}))
"""


def test_a_training_job_with_its_evaluations_imports_no_scipy_and_no_compiler(tmp_path):
    g = np.random.default_rng(0)
    y = g.integers(0, 4, size=160)
    x = (g.normal(size=(160, 3, 8, 8)) + y[:, None, None, None]).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x[:120], y_train=y[:120], x_test=x[120:], y_test=y[120:])
    job = {"data": {"name": "npz", "path": str(tmp_path / "d.npz"), "memory_map": True}, "model": {"name": "cnn"},
           "epochs": 2, "batch_size": 32, "eval_every": 4, "early_stopping": {"enabled": False}}
    env = dict(os.environ, IVON_DIAG_DATA_ROOTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job), str(tmp_path / "r.db"), str(tmp_path / "ck"),
                          ",".join(HEAVY)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["status"] == "done" and got["evaluations"] >= 2
    assert got["heavy"] == []
