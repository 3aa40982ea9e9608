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
    tracker.log_examples(labels=y.tolist())
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
    # each example's LOO loss averaged over the three evaluations, ranked: the "likely mislabeled" list
    mean = torch.stack(losses).double().mean(0)
    _, suspects = store.examples_at(tracker.run_id, k=3, by="loo_mean")
    assert [r.idx for r in suspects] == torch.argsort(mean, descending=True, stable=True)[:3].tolist()
    assert suspects[0].loo_loss_mean == pytest.approx(float(mean[suspects[0].idx]), rel=1e-5)
    assert {r.loo_loss_evals for r in suspects} == {3}
    res.loo_losses[:] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        tracker.log_evaluation(40, res)
