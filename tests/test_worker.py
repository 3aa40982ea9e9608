"""The worker as real processes: train, SIGKILL and resume to the same weights; bad configs fail cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.store import Store, make_engine, upgrade
from worker.config import ConfigError, load_config, parse_config
from worker.early_stopping import EarlyStopping

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
JOB = {"name": "resume", "data": {"name": "synthetic", "n_synthetic": 600}, "model": {"name": "mlp", "hidden": [32]},
       "epochs": 12, "batch_size": 16, "eval_every": 15, "label_noise": {"fraction": 0.1},
       "early_stopping": {"enabled": False}}


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ivon_diag.cli", *args], env=ENV, **kw)


def test_killed_worker_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    ref = store.create_run("reference", JOB)
    victim = store.create_run("killed", JOB)
    # the reference, uninterrupted, in a worker of its own
    p = _cli("--db", url, "worker", "--once", "--checkpoint-dir", str(tmp_path / "ck"), "--lease", "3")
    deadline = time.time() + 120
    while time.time() < deadline and len(store.evaluations(victim.id)) < 2:  # the 2nd job has started
        time.sleep(0.2)
    assert len(store.evaluations(victim.id)) >= 2
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert store.get_run(victim.id).status == "running"
    time.sleep(3.5)  # the lease expires
    p2 = _cli("--db", url, "worker", "--once", "--checkpoint-dir", str(tmp_path / "ck"), "--lease", "3")
    assert p2.wait(timeout=300) == 0
    assert store.get_run(ref.id).status == "done" and store.get_run(victim.id).status == "done"
    a = torch.load(tmp_path / "ck" / store.get_run(ref.id).uid / "model.pt")["model"]
    b = torch.load(tmp_path / "ck" / store.get_run(victim.id).uid / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [e.step for e in store.evaluations(victim.id)]
    assert steps == sorted(set(steps)) == [e.step for e in store.evaluations(ref.id)]  # none missing or doubled
    assert store.get_job_for_run(victim.id).attempts == 2
    _, top = store.examples_at(victim.id, k=30)
    assert sum(r.flipped for r in top) >= 10  # flipped labels rank among the most sensitive
    # the running mean LOO loss survives the kill: the re-evaluated step replaced its own term, no more
    ta, tb = (store.examples_table(r.id, steps[-1]) for r in (ref, victim))
    assert ta["loo_loss_mean"] == tb["loo_loss_mean"] and set(tb["loo_loss_evals"]) == {len(steps)}
    _, suspects = store.examples_at(victim.id, k=30, by="loo_mean")
    assert sum(r.flipped for r in suspects) >= 10


def test_train_command_and_bad_inputs(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    cfg = tmp_path / "job.yaml"
    cfg.write_text("name: tiny\ndata: {name: synthetic, n_synthetic: 200}\nmodel: {name: logreg}\nepochs: 2\n"
                   "eval_every: 5\n")
    out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", url, "train", str(cfg), "--checkpoint-dir",
                          str(tmp_path / "ck")], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    store = Store(url)
    run = store.list_runs()[0]
    assert run.status == "done" and len(store.evaluations(run.id)) >= 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochs": 0, "model": {"name": "transformer"}, "surprise": 1}))
    out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", url, "train", str(bad)], env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "epochs" in out.stderr and "model.name" in out.stderr and "surprise" in out.stderr
    assert "Traceback" not in out.stderr
    missing = {"name": "npz", "data": {"name": "npz", "path": str(tmp_path / "nope.npz")}, "epochs": 1}
    run2 = store.create_run("missing file", missing)
    p = _cli("--db", url, "worker", "--once", "--checkpoint-dir", str(tmp_path / "ck"))
    assert p.wait(timeout=60) == 0
    failed = store.get_run(run2.id)
    assert failed.status == "failed" and "data file not found" in failed.error
    assert store.get_run(run.id).status == "done"  # nothing already written is lost


def test_config_files_and_errors(tmp_path):
    (tmp_path / "a.toml").write_text('name = "t"\nepochs = 3\n[optimizer]\nlr = 0.1\nbeta2 = 0.999\n')
    assert load_config(tmp_path / "a.toml").optimizer.beta2 == 0.999
    with pytest.raises(ConfigError, match="optimizer.beta2"):
        parse_config({"optimizer": {"beta2": 1.5}})
    with pytest.raises(ConfigError, match="data.path is required"):
        parse_config({"data": {"name": "npz"}})
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "b.json")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.json")


def test_early_stopping_follows_lightning_semantics():
    es = EarlyStopping(patience=2, min_delta=0.01)
    stops = [es.step({"loo": v}, i) for i, v in enumerate([1.0, 0.9, 0.895, 0.899])]
    assert stops == [False, False, False, True]  # 0.895 is not better by min_delta: patience 2 runs out
    assert es.best == 0.9 and es.best_step == 1 and es.stopped_step == 3
    es2 = EarlyStopping(stopping_threshold=0.2)
    assert es2.step({"loo": 0.1}, 0)
    es3 = EarlyStopping()
    assert es3.step({"loo": float("nan")}, 3) and "not finite" in es3.reason
    with pytest.raises(KeyError, match="monitors 'loo'"):
        EarlyStopping().step({"test_nll": 1.0}, 0)
    # a sampled monitor: an improvement inside one standard error is sampling noise, not progress
    es4 = EarlyStopping(patience=2)
    seq = [(1.0, 0.05), (0.97, 0.05), (0.96, 0.05), (0.90, 0.05)]
    assert [es4.step({"loo": v, "loo_se": se}, i) for i, (v, se) in enumerate(seq[:3])] == [False, False, True]
    assert es4.best == 1.0 and es4.stopped_step == 2
    es5 = EarlyStopping(patience=2, min_delta_se=0.0)  # the old behaviour
    assert not any(es5.step({"loo": v, "loo_se": se}, i) for i, (v, se) in enumerate(seq)) and es5.best == 0.90


@pytest.mark.parametrize("opt_name", ["ivon", "adamw"])
def test_micro_batches_accumulate_into_one_step(tmp_path, opt_name):
    from worker.service import run_job

    url = f"sqlite:///{tmp_path / 'mb.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    cfg = {"name": "mb", "data": {"name": "synthetic", "n_synthetic": 160}, "model": {"name": "logreg"},
           "optimizer": {"name": opt_name, "lr": 0.5 if opt_name == "ivon" else 0.01}, "epochs": 2,
           "batch_size": 32, "micro_batches": 3, "eval_every": 4, "early_stopping": {"enabled": False}}
    run = store.create_run("mb", cfg, enqueue=False)
    assert run_job(store, run.id, tmp_path / "ck", log=lambda *_: None) == "done"
    evs = store.evaluations(run.id)
    assert [e.step for e in evs] == [4, 8] and all(e.loo is not None for e in evs)
    from app.store.job_config import MONITORS

    assert {"loo", *evs[-1].metrics} <= set(MONITORS)  # early stopping may monitor whatever an evaluation records


def test_fused_optimizer_option_trains_to_the_same_evaluations(tmp_path):
    from worker.service import run_job

    url = f"sqlite:///{tmp_path / 'fu.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    evals = {}
    for noise in ("torch", "counter"):
        for fused in (False, True):  # the 512x160 weight takes the compiled kernels
            cfg = {"name": "fused", "data": {"name": "synthetic", "n_synthetic": 96},
                   "model": {"name": "mlp", "hidden": [512, 160]}, "optimizer": {"fused": fused, "noise": noise},
                   "epochs": 2, "batch_size": 32, "eval_every": 3, "early_stopping": {"enabled": False}}
            run = store.create_run("fused", cfg, enqueue=False)
            assert run_job(store, run.id, tmp_path / f"ck{fused}{noise}", log=lambda *_: None) == "done"
            evals[fused, noise] = [(e.step, e.loo, e.metrics["train_nll"]) for e in store.evaluations(run.id)]
    for noise in ("torch", "counter"):
        assert [e[0] for e in evals[True, noise]] == [3, 6]
        for a, b in zip(evals[True, noise], evals[False, noise]):  # σ's rounding differs by an ulp between the
            # paths (rsqrt((h + δ) ess) against rsqrt(h + δ) ess^-1/2); this tiny, wide model amplifies it over steps
            assert a[1] == pytest.approx(b[1], rel=1e-3) and a[2] == pytest.approx(b[2], rel=1e-3)
    assert evals[False, "counter"] != evals[False, "torch"]  # the option reached the optimizer
    # the defaults (fused: null, noise: auto) choose the fused kernels with counter noise for this CPU model
    cfg = {"name": "default", "data": {"name": "synthetic", "n_synthetic": 96},
           "model": {"name": "mlp", "hidden": [512, 160]}, "epochs": 2, "batch_size": 32, "eval_every": 3,
           "early_stopping": {"enabled": False}}
    run = store.create_run("default", cfg, enqueue=False)
    assert run_job(store, run.id, tmp_path / "ck-default", log=lambda *_: None) == "done"
    assert [(e.step, e.loo, e.metrics["train_nll"]) for e in store.evaluations(run.id)] == evals[True, "counter"]
    with pytest.raises(ConfigError, match="fused"):
        parse_config({"name": "x", "optimizer": {"fused": "sometimes"}})
    with pytest.raises(ConfigError, match="noise"):
        parse_config({"name": "x", "optimizer": {"noise": "philox"}})


def _train_job(tmp_path):
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps({"name": "logs", "data": {"name": "synthetic", "n_synthetic": 200},
                               "model": {"name": "logreg"}, "epochs": 2, "eval_every": 2,
                               "early_stopping": {"enabled": False}}))
    return [sys.executable, "-m", "ivon_diag.cli", "--db", f"sqlite:///{tmp_path / 'l.db'}", "train", str(cfg),
            "--checkpoint-dir", str(tmp_path / "ck")]


def test_structured_logs_when_not_on_a_terminal(tmp_path):
    out = subprocess.run(_train_job(tmp_path), env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]  # every line is one JSON object
    evals = [e for e in lines if e.get("event") == "evaluation"]
    assert len(evals) >= 2 and all({"time", "msg", "run", "step", "loo", "test_nll", "seconds"} <= e.keys()
                                   for e in evals)
    assert [e["step"] for e in evals] == sorted(e["step"] for e in evals)
    assert lines[-1]["event"] == "ended" and lines[-1]["status"] == "done"
    assert "step/s" not in out.stderr  # no progress bar without a terminal


def test_the_optimizers_compilation_is_announced_in_the_log(tmp_path):
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps({"name": "big", "data": {"name": "synthetic", "n_synthetic": 64},
                               "model": {"name": "mlp", "hidden": [512, 160]}, "epochs": 1, "eval_every": 100,
                               "early_stopping": {"enabled": False}}))
    cmd = [sys.executable, "-m", "ivon_diag.cli", "--db", f"sqlite:///{tmp_path / 'b.db'}", "train", str(cfg),
           "--checkpoint-dir", str(tmp_path / "ck")]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    said = [e for e in lines if e.get("event") == "library"]
    assert said and "compiling the fused kernels" in said[0]["msg"] and said[0]["logger"] == "ivon_core"
    assert lines.index(said[0]) < next(i for i, e in enumerate(lines) if e.get("event") == "ended")


def test_progress_bar_on_a_terminal(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a 120-column terminal
    p = subprocess.Popen(_train_job(tmp_path), env=ENV, stdout=slave, stderr=slave)
    os.close(slave)
    text = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        text += chunk
    assert p.wait(timeout=120) == 0
    screen = text.decode(errors="replace")
    assert "run 1:" in screen and "100%" in screen and "step" in screen and "loo=" in screen
    assert '"msg"' not in screen  # plain lines for people


def test_covariance_option_refits_a_laplace_at_each_evaluation(tmp_path):
    """covariance: last_layer on logistic regression is the exact Laplace (the head is the whole model): the stored
    LOO equals one recomputed from the final weights; kfac runs to the end with finite values."""
    from sensitivity import compute_sensitivities
    from sensitivity.covariance import DenseCovariance
    from worker.config import parse_config
    from worker.data import inject_label_noise, load_dataset
    from worker.trainer import build_model

    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    base = {"data": {"name": "synthetic", "n_synthetic": 240}, "epochs": 3, "batch_size": 32, "eval_every": 4,
            "early_stopping": {"enabled": False}}
    ll = store.create_run("ll", {**base, "name": "ll", "model": {"name": "logreg"},
                                 "sensitivity": {"covariance": "last_layer"}})
    kf = store.create_run("kf", {**base, "name": "kf", "model": {"name": "mlp", "hidden": [16]},
                                 "sensitivity": {"covariance": "kfac"}})
    mlp = {**base, "model": {"name": "mlp", "hidden": [16]}}
    plain = store.create_run("plain", {**mlp, "name": "plain", "sensitivity": {"form": "first_order"}})
    block = store.create_run("block", {**mlp, "name": "block",
                                       "sensitivity": {"covariance": "optimizer_with_last_layer"}})
    second = store.create_run("second", {**mlp, "name": "second",
                                         "sensitivity": {"form": "second_order", "max_amplification": 2}})
    ray = store.create_run("ray", {**mlp, "name": "ray"})  # uncalibrated (240 examples), auto: rayleigh, capped at 2
    fixed = store.create_run("fixed", {**mlp, "name": "fixed", "calibration": {"scale": 2.0}})  # calibrated: auto
    p = _cli("--db", url, "worker", "--once", "--checkpoint-dir", str(tmp_path / "ck"))  # scores in first order
    assert p.wait(timeout=300) == 0
    runs = (ll, kf, plain, block, second, ray, fixed)
    assert all(store.get_run(r.id).status == "done" for r in runs)
    assert all(e.loo == e.loo and e.loo > 0 for r in runs for e in store.evaluations(r.id))
    # the same training (same seed), a different covariance: the head's exact block changes every LOO
    pairs = zip(store.evaluations(plain.id), store.evaluations(block.id))
    assert all(a.step == b.step and a.loo != b.loo for a, b in pairs)
    # the second-order form adds a correction to the first-order deviation: a higher LOO at every evaluation
    pairs = list(zip(store.evaluations(plain.id), store.evaluations(second.id)))
    assert pairs and all(a.step == b.step and b.loo > a.loo for a, b in pairs)
    # the default Rayleigh form sums that correction's series: higher than the first order's at every evaluation
    pairs = list(zip(store.evaluations(plain.id), store.evaluations(ray.id)))
    assert pairs and all(a.step == b.step and b.loo > a.loo for a, b in pairs)
    # each evaluation of a capped form says what share of examples the cap bound; the first order has no cap
    assert all("loo_capped" not in a.metrics and 0.0 <= b.metrics["loo_capped"] <= 1.0 for a, b in pairs)
    # a calibrated job's auto form is the first order: its LOO before the scale is the first-order run's
    pairs = list(zip(store.evaluations(plain.id), store.evaluations(fixed.id)))
    assert pairs and all(a.step == b.step and b.metrics["loo_raw"] == pytest.approx(a.loo, rel=1e-6)
                         and "loo_capped" not in b.metrics for a, b in pairs)
    # and how much of IVON's curvature is still hess_init's (the LOO's scale follows hess_init where it is near 1)
    shares = [e.metrics["hess_init_share"] for e in store.evaluations(plain.id)]
    assert shares and all(0.0 < s <= 1.0 for s in shares)

    cfg = parse_config({**base, "name": "ll", "model": {"name": "logreg"}})
    data = inject_label_noise(load_dataset(cfg.data, cfg.seed), cfg.label_noise)
    model = build_model(cfg, data)
    model.load_state_dict(torch.load(tmp_path / "ck" / store.get_run(ll.id).uid / "model.pt")["model"])
    cov = DenseCovariance.laplace(model, (data.xtr, data.ytr), prior_precision=data.n * cfg.optimizer.weight_decay)
    expected = compute_sensitivities(model, (data.xtr, data.ytr), cov).loo  # "auto": corrected with a dense Σ
    assert abs(store.evaluations(ll.id)[-1].loo - expected) < 1e-4 * max(1.0, expected)
    with pytest.raises(ConfigError, match="sensitivity.covariance"):
        parse_config({"sensitivity": {"covariance": "full"}})
    with pytest.raises(ConfigError, match="sensitivity.max_amplification"):
        parse_config({"sensitivity": {"form": "second_order", "max_amplification": 1.0}})
