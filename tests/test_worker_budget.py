"""A job under diagnostics.budget (the default without eval_every): evaluations score slices in rotation, report
the LOO with its standard error, and never change what training computes; a released job resumes its rotation."""

import math

import pytest
import torch

from app.store import Store, make_engine, upgrade
from worker.config import parse_config
from worker.trainer import Trainer

JOB = {"data": {"name": "synthetic", "n_synthetic": 2500}, "model": {"name": "mlp", "hidden": [32]}, "epochs": 6,
       "batch_size": 32, "label_noise": {"fraction": 0.1}, "early_stopping": {"enabled": False}}


def _train(tmp_path, job: dict, name: str, stop=lambda: False, store: Store | None = None, run_id=None):
    if store is None:
        url = f"sqlite:///{tmp_path / (name + '.db')}"
        upgrade(make_engine(url))
        store = Store(url)
    cfg = parse_config(job)
    if run_id is None:
        run_id = store.create_run(name, cfg.model_dump(mode="json"), enqueue=False).id
    uid = store.get_run(run_id).uid
    status = Trainer(cfg, store, run_id, tmp_path / "ck", uid, should_stop=stop, log=lambda *a, **k: None).run()
    return store, run_id, status


def _final(tmp_path, store, run_id):
    return torch.load(tmp_path / "ck" / store.get_run(run_id).uid / "model.pt", weights_only=True)["model"]


@pytest.fixture
def sampled_last(monkeypatch):
    """The last evaluation's slice as the credit pays, even where every example would cost less than its fixed part
    (these small jobs test the sampled estimate)."""
    monkeypatch.setattr("worker.cadence.EXACT_LAST", 0.0)


def test_a_budgeted_job_samples_the_loo_with_its_error_and_rotates_the_examples(tmp_path, sampled_last):
    # without screening (tested below: its last evaluation screens every example it does not score)
    store, rid, status = _train(tmp_path, {**JOB, "diagnostics": {"budget": 2.0, "test_sample": 200, "screen": False}},
                                "budget")
    assert status == "done"
    evs = store.evaluations(rid)
    assert len(evs) >= 3
    n = 1900  # the training split of 2,500 less the calibration split (5%)
    *before, last = evs
    for e in before:
        assert 0 < e.metrics["loo_sample"] < n and e.metrics["loo_se"] > 0
        assert "test_mc_nll" not in e.metrics and e.metrics["test_nll_se"] > 0  # the test subset, at the mean
    assert "test_mc_nll" in last.metrics and "test_nll_se" not in last.metrics  # the whole test set at the end
    sizes = [e.n_examples for e in evs]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]  # the snapshot grows with each slice
    table = store.examples_table(rid, last.step)
    assert len(set(table["idx"])) == len(table["idx"]) == sizes[-1]
    assert set(table["scored_step"]) <= {e.step for e in evs} and len(set(table["scored_step"])) > 1
    assert sum(e.metrics["loo_sample"] for e in evs) >= sizes[-1]
    for e in evs:  # the stated error bounds how far the sample's estimate may sit from the truth: finite, positive
        assert e.loo > 0 and (e.metrics["loo_se"] < e.loo or e.metrics["loo_sample"] < 200)


def test_evaluations_do_not_change_what_training_computes(tmp_path, sampled_last):
    """The same job evaluated every 7 steps, every epoch, or at the budget's cadence: the same final weights."""
    finals, last = [], {}
    for name, extra in (("steps", {"eval_every": 7}), ("epochs", {"eval_every": "1 epoch"}),
                        ("budget", {"diagnostics": {"budget": 0.3, "screen": False}})):
        store, rid, _ = _train(tmp_path, {**JOB, "epochs": 3, **extra}, name)
        finals.append(_final(tmp_path, store, rid))
        last[name] = store.evaluations(rid)[-1]
        if name == "epochs":
            # 2000 less the 100 held out for calibration, in batches of 32 → 60 steps an epoch
            assert [e.step for e in store.evaluations(rid)] == [60, 120, 180]
    assert all(torch.equal(finals[0][k], f[k]) for f in finals[1:] for k in finals[0])
    # the same weights: the budget's sampled slice (a quarter of it the largest training losses) estimates the training
    # set's loss and accuracy that the full pass measures
    full, sampled = last["epochs"].metrics, last["budget"].metrics
    assert last["budget"].metrics["loo_sample"] < 1900
    assert sampled["train_nll"] == pytest.approx(full["train_nll"], rel=0.1)
    assert sampled["train_acc"] == pytest.approx(full["train_acc"], abs=0.03)


def test_a_released_budgeted_job_resumes_its_rotation_and_ends_with_the_same_weights(tmp_path):
    job = {**JOB, "epochs": 4, "diagnostics": {"budget": 1.0}}
    ref_store, ref, _ = _train(tmp_path, job, "reference")
    calls = []

    def stop_after_first():
        calls.append(1)
        return len(calls) == 1

    store, rid, status = _train(tmp_path, job, "released", stop=stop_after_first)
    assert status == "released"
    first = store.evaluations(rid)
    assert len(first) == 1
    _, _, status = _train(tmp_path, job, "released", store=store, run_id=rid)
    assert status == "done"
    a, b = _final(tmp_path, ref_store, ref), _final(tmp_path, store, rid)
    assert all(torch.equal(a[k], b[k]) for k in a)
    evs = store.evaluations(rid)
    assert len(evs) >= 2 and evs[0].step == first[0].step
    table = store.examples_table(rid, evs[-1].step)
    assert len(set(table["idx"])) == len(table["idx"])  # the resumed rotation did not restart its cycle's slices


def test_a_budgeted_job_screens_between_its_slices_and_marks_the_screened_rows(tmp_path):
    """screen_min_spearman -1: the screen is used whatever it measures (the check is still made and reported);
    screen off: no check, no screened row."""
    job = {**JOB, "diagnostics": {"budget": 2.0, "test_sample": 200, "screen_min_spearman": -1.0}}
    store, rid, status = _train(tmp_path, job, "screened")
    assert status == "done"
    evs = store.evaluations(rid)
    assert all(-1 <= e.metrics["screen_spearman"] <= 1 for e in evs)
    assert evs[0].metrics["screened"] == 0 and sum(e.metrics["screened"] for e in evs) > 0
    at = next(e.step for e in evs if e.metrics["screened"])  # (a later exact slice may rescore them all)
    table = store.examples_table(rid, at)
    marked = [s for s, scr in zip(table["scored_step"], table["screened"]) if scr]
    assert marked and not all(table["screened"]) and set(marked) == {at}
    assert all(math.isfinite(s) for s, scr in zip(table["score"], table["screened"]) if scr)
    off = {**JOB, "diagnostics": {"budget": 2.0, "test_sample": 200, "screen": False}}
    store, rid, _ = _train(tmp_path, off, "plain")
    evs = store.evaluations(rid)
    assert not any("screen_spearman" in e.metrics for e in evs)
    assert not any(store.examples_table(rid, evs[-1].step)["screened"])


def test_a_small_jobs_last_evaluation_scores_every_example(tmp_path):
    """Where scoring every example costs less than an evaluation's fixed part (test metrics, the store), the run's
    final LOO is exact whatever the credit: before, a 300-example job ended on a slice of 64 (its LOO's standard
    error a fifth of it) because the first evaluation's fixed costs had spent a sub-second job's budget."""
    job = {**JOB, "data": {"name": "synthetic", "n_synthetic": 400}, "epochs": 20}
    store, rid, status = _train(tmp_path, job, "small")
    last = store.evaluations(rid)[-1]
    n = len(store.examples_table(rid, last.step)["idx"])
    assert status == "done" and last.metrics["loo_sample"] == n >= 250 and last.metrics["loo_se"] == 0
