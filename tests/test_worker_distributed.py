"""`torchrun --nproc_per_node=2 -m ivon_diag train` on CPU with gloo: data-parallel IVON with per-rank noise, the
sensitivity pass sharded over the ranks and joined on rank 0, which alone writes; the results agree with
single-process runs within their seed-to-seed spread."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.store import Store
from tests.conftest import free_port

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
JOB = {"data": {"name": "digits", "n_train": 400}, "model": {"name": "mlp", "hidden": [32]}, "epochs": 8,
       "batch_size": 32, "eval_every": 26, "early_stopping": {"enabled": False}}


def _train(tmp_path, url, name, seed, ranks=1):
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps({**JOB, "name": name, "seed": seed}))
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                f"--master_port={free_port()}"] if ranks > 1 else [sys.executable]
    out = subprocess.run([*launcher, "-m", "ivon_diag", "--db", url, "train", str(cfg), "--checkpoint-dir",
                          str(tmp_path / "ck")], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_ranks_agree_with_one_process_within_noise(tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    _train(tmp_path, url, "single-0", 0)
    _train(tmp_path, url, "single-1", 1)
    _train(tmp_path, url, "ranks-2", 0, ranks=2)
    store = Store(url)
    runs = {r.name: r for r in store.list_runs()}
    assert sorted(runs) == ["ranks-2", "single-0", "single-1"]  # the second rank created no run
    ev = {name: store.evaluations(r.id) for name, r in runs.items()}
    assert [e.step for e in ev["ranks-2"]] == [e.step for e in ev["single-0"]]
    n = runs["ranks-2"].n_examples
    assert all(e.n_examples == n for e in ev["ranks-2"])  # both shards joined in every evaluation
    table = store.examples_table(runs["ranks-2"].id, ev["ranks-2"][-1].step)
    assert sorted(table["idx"]) == list(range(n))
    last = {name: e[-1] for name, e in ev.items()}
    for key in ("loo", "test_nll"):
        def get(e, key=key):
            return e.loo if key == "loo" else e.metrics[key]

        spread = abs(get(last["single-1"]) - get(last["single-0"]))
        gap = abs(get(last["ranks-2"]) - get(last["single-0"]))
        print(f"{key}: 2 ranks {get(last['ranks-2']):.4f}, seeds 0/1 {get(last['single-0']):.4f} / "
              f"{get(last['single-1']):.4f}")
        assert gap <= 3 * spread + 0.02 * get(last["single-0"]), (key, gap, spread)
    assert last["ranks-2"].metrics["test_accuracy"] >= last["single-0"].metrics["test_accuracy"] - 0.05
    assert not (tmp_path / "ck" / runs["ranks-2"].uid / "resume.pt").exists()  # ended: nothing resumes it


@pytest.mark.slow
def test_two_ranks_screen_their_shares_and_rank_0_writes_the_sweep(tmp_path):
    # a budgeted job (no fixed cadence) that screens: every rank screens its share of the check and of each sweep
    # (a rank left out would hang the job's collectives), rank 0 maps and writes them
    url = f"sqlite:///{tmp_path / 'd.db'}"
    cfg = tmp_path / "scr.json"
    job = {k: v for k, v in JOB.items() if k != "eval_every"}
    cfg.write_text(json.dumps({**job, "name": "screen-2", "diagnostics": {"budget": 2.0, "screen_min_spearman": 0.5}}))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "ivon_diag", "--db", url, "train", str(cfg),
                          "--checkpoint-dir", str(tmp_path / "ck")], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    store = Store(url)
    (run,) = store.list_runs()
    evs = store.evaluations(run.id)
    assert all(-1.0 <= e.metrics["screen_spearman"] <= 1.0 for e in evs)  # each evaluation checked its slice
    swept = [e for e in evs if e.metrics.get("screened", 0) > 0]
    assert swept, [(e.step, e.metrics) for e in evs]
    table = store.examples_table(run.id, swept[-1].step)
    marked = np.asarray(table["screened"], bool) & (np.asarray(table["scored_step"]) == swept[-1].step)
    assert marked.sum() == swept[-1].metrics["screened"]  # every screened example of both ranks' shares, once
    assert len(set(table["idx"])) == len(table["idx"]) and np.isfinite(np.asarray(table["score"])[marked]).all()


@pytest.mark.slow
def test_queue_worker_under_torchrun(tmp_path):
    """`torchrun … -m ivon_diag worker --once`: rank 0 claims the queued runs and both ranks train each."""
    from app.store import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'q.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    runs = [store.create_run(f"queued-{i}", {**JOB, "name": f"queued-{i}", "epochs": 2}) for i in range(2)]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "ivon_diag", "--db", url, "worker", "--once",
                          "--checkpoint-dir", str(tmp_path / "ck")], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for run in runs:
        assert store.get_run(run.id).status == "done"
        evs = store.evaluations(run.id)
        assert evs and all(e.n_examples == 400 for e in evs)
    assert len(store.list_runs()) == 2


@pytest.mark.slow
def test_a_rank_that_cannot_start_fails_the_run_on_every_rank(tmp_path):
    """Data that only one rank cannot load (a file missing on one node, say): the run fails with that rank's
    reason stored, and no rank waits for ever."""
    (tmp_path / "onerank.py").write_text(
        "import os\nimport torch\n\n"
        "def make(seed):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise FileNotFoundError('/data/shard-1 is not on this node')\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    x = torch.randn(64, 4, generator=g)\n"
        "    return None, (x, (x[:, 0] > 0).long()), None\n")
    url = f"sqlite:///{tmp_path / 'f.db'}"
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps({"name": "one-rank", "data": {"name": "factory", "factory": "onerank:make"},
                               "model": {"name": "logreg"}, "epochs": 1, "early_stopping": {"enabled": False}}))
    env = {**ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "ivon_diag", "--db", url, "train", str(cfg),
                          "--checkpoint-dir", str(tmp_path / "ck")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    run = Store(url).list_runs()[0]
    assert run.status == "failed" and "rank 1" in run.error and "not on this node" in run.error


@pytest.mark.slow
def test_sigterm_under_torchrun_releases_the_job_and_a_new_group_resumes_it(tmp_path):
    """torchrun passes SIGTERM to every rank: rank 0 checkpoints (with each rank's noise) and releases the job, the
    others follow; a new 2-rank worker resumes it and the run ends with every evaluation exactly once."""
    import signal
    import time

    from app.store import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 't.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    job = {**JOB, "name": "term", "epochs": 12}
    run = store.create_run("term", job)

    def worker(*extra):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={free_port()}", "-m", "ivon_diag", "--db", url, "worker",
                                 "--checkpoint-dir", str(tmp_path / "ck"), "--lease", "10", *extra], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    p = worker()
    deadline = time.time() + 120
    while time.time() < deadline and len(store.evaluations(run.id)) < 2:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    assert store.get_job_for_run(run.id).state == "queued"
    ck = torch.load(tmp_path / "ck" / store.get_run(run.id).uid / "resume.pt", weights_only=True)
    gens = [r["generators"]["cpu"] for r in ck["ranks"]]
    assert len(gens) == 2 and not torch.equal(gens[0], gens[1])  # each rank's own noise, saved for a resume
    assert worker("--once").wait(timeout=300) == 0
    assert store.get_run(run.id).status == "done"
    steps = [e.step for e in store.evaluations(run.id)]
    total = job["epochs"] * -(-400 // job["batch_size"])
    assert steps == sorted({*range(job["eval_every"], total + 1, job["eval_every"]), total})
