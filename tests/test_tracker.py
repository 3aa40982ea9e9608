"""The README's tracker example, run against a real SQLite file."""

import pytest
import torch
from torch import nn

from ivon_core import IVON
from sensitivity import compute_sensitivities, ivon_variance
from worker.tracker import Tracker


def test_tracker_logs_a_users_own_loop(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(200, 5), torch.randint(0, 3, (200,))
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = IVON(model.parameters(), lr=0.1, ess=200)
    tracker = Tracker(f"sqlite:///{tmp_path / 'own.db'}", "my-run", config={"lr": 0.1})
    tracker.log_examples(labels=y.tolist(), sources=[f"shard-3.parquet:{i}" for i in range(200)],
                         class_names=["ant", "bee", "cow"])
    losses = []
    for step in range(1, 31):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step % 10 == 0:
            res = compute_sensitivities(model, (x, y), ivon_variance(optimizer, model))
            tracker.log_evaluation(step, res, metrics={"test_nll": 1.0}, optimizer=optimizer)
            losses.append(res.loo_losses.clone())
    tracker.finish()
    store = tracker.store
    assert store.get_run(tracker.run_id).status == "done"
    assert [e.step for e in store.evaluations(tracker.run_id)] == [10, 20, 30]
    assert [s for s, _ in store.curve(tracker.run_id, "loo")] == [10, 20, 30]
    # the worker's warning signs: the capped share, and how much of IVON's curvature is still hess_init's
    last = store.evaluations(tracker.run_id)[-1].metrics
    assert last["loo_capped"] == res.capped and last["hess_init_share"] == optimizer.hess_init_share()
    assert 0.9 < last["hess_init_share"] <= 1.0  # 30 steps at the default β2: h is still hess_init
    _, top = store.examples_at(tracker.run_id, k=5)
    assert top[0].idx == int(res.top_k(1)[0]) and top[0].label == int(y[top[0].idx])
    assert top[0].source == f"shard-3.parquet:{top[0].idx}"  # traced back to the user's data
    assert store.get_run(tracker.run_id).class_names == ["ant", "bee", "cow"]
    # each example's LOO loss averaged over the three evaluations, ranked: the "likely mislabeled" list
    mean = torch.stack(losses).double().mean(0)
    _, suspects = store.examples_at(tracker.run_id, k=3, by="loo_mean")
    assert [r.idx for r in suspects] == torch.argsort(mean, descending=True, stable=True)[:3].tolist()
    assert suspects[0].loo_loss_mean == pytest.approx(float(mean[suspects[0].idx]), rel=1e-5)
    assert {r.loo_loss_evals for r in suspects} == {3}
    res.loo_losses[:] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        tracker.log_evaluation(40, res)


def test_tracker_logs_test_predictions_and_influence_for_the_dashboard(tmp_path):
    from sensitivity import influence

    torch.manual_seed(0)
    x, y = torch.randn(120, 5), torch.randint(0, 3, (120,))
    xt, yt = torch.randn(20, 5), torch.randint(0, 3, (20,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = IVON(model.parameters(), lr=0.1, ess=120)
    tracker = Tracker(f"sqlite:///{tmp_path / 'own.db'}", "with-test")
    tracker.log_examples(labels=y.tolist())
    tracker.log_test_examples(yt.tolist())
    for _ in range(10):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    variance = ivon_variance(optimizer, model)
    res = compute_sensitivities(model, (x, y), variance)
    with torch.no_grad():
        probs = model(xt).softmax(-1)
    tracker.log_evaluation(10, res, optimizer=optimizer, test_probs=probs.numpy())
    ids = [3, 11]
    inf = influence(model, xt[ids], (x, y), variance, targets=yt[ids], result=res)
    tracker.log_influence(inf, ids, yt[ids].tolist(), y.tolist(), k=4)
    tracker.finish()
    store = tracker.store
    total, rows = store.test_examples(tracker.run_id)
    assert total == 20 and rows[0].loss == pytest.approx(float(-probs[rows[0].idx, yt[rows[0].idx]].log()), rel=1e-5)
    (query,) = store.list_influence(tracker.run_id)
    assert query.status == "done" and [r["test_idx"] for r in query.result] == ids
    top = query.result[0]["proponents"][0]
    assert top["idx"] == int(inf.proponents(0, 1)[0]) and top["label"] == int(y[top["idx"]])


def test_tracker_calibrates_the_loo_on_the_users_held_out_data(tmp_path):
    from sensitivity.calibration import loo_at

    torch.manual_seed(1)
    x, y = torch.randn(300, 5), torch.randint(0, 3, (300,))
    xv, yv = torch.randn(100, 5), torch.randint(0, 3, (100,))
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = IVON(model.parameters(), lr=0.1, ess=300)
    with pytest.raises(ValueError, match="total_steps"):
        Tracker(f"sqlite:///{tmp_path / 'cal.db'}", "frozen", calibration="frozen")
    tracker = Tracker(f"sqlite:///{tmp_path / 'cal.db'}", "calibrated", calibration="frozen_variance",
                      total_steps=40, freeze_at=0.5)
    tracker.log_examples(labels=y.tolist())
    for step in range(1, 41):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step % 10 == 0:
            res = compute_sensitivities(model, (x, y), ivon_variance(optimizer, model))
            with torch.no_grad():
                val = float(nn.functional.cross_entropy(model(xv), yv))
            if step == 10:
                with pytest.raises(ValueError, match="heldout_nll"):
                    tracker.log_evaluation(step, res, optimizer=optimizer)
            tracker.log_evaluation(step, res, optimizer=optimizer, heldout_nll=val, heldout_examples=100)
            ev = tracker.store.evaluations(tracker.run_id)[-1]
            m = ev.metrics
            assert m["loo_raw"] == pytest.approx(res.loo) and m["calibration_nll"] == val
            assert ev.loo == pytest.approx(loo_at(res, m["calibration_scale"]))
            if step <= 20:  # fitting: the LOO matches the held-out NLL it was fitted to, as far as a scale can
                assert m["calibration_step"] == step
    assert m["calibration_step"] == 20  # frozen after half the run
    from app.store.calibration import calibration_summary

    line = calibration_summary(tracker.store.get_run(tracker.run_id).config, m)["line"]
    assert "100 held-out examples" in line and "step 20" in line and "drift" in line
