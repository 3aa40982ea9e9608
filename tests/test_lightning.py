"""The Lightning callback with the real lightning package: a LightningModule trained with IVON, unchanged but for
its optimizer, gets evaluations, scores and early stopping on the LOO in the store."""

import re
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from app.store import Store, make_engine  # noqa: E402
from ivon_core import IVON  # noqa: E402
from worker.early_stopping import EarlyStopping  # noqa: E402
from worker.integrations.lightning import IVONDiagnostics  # noqa: E402

DOC = Path(__file__).parents[1] / "docs" / "integrations" / "lightning.md"


def _data(n=240):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


class Net(L.LightningModule):
    def __init__(self, optimizer="ivon", n=240):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
        self.kind, self.n = optimizer, n

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.kind == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        return IVON(self.parameters(), lr=0.1, ess=self.n, hess_init=0.5, beta2=0.99)


def _trainer(callback, epochs, root, **kw):
    return L.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=root, **kw)


def test_a_lightning_fit_writes_evaluations_scores_and_the_loo_to_the_store(tmp_path):
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    torch.manual_seed(0)
    callback = IVONDiagnostics(db, "lightning-run", config={"source": "test"})
    trainer = _trainer(callback, 3, tmp_path)
    trainer.fit(Net(), DataLoader(_data(), batch_size=32, shuffle=True))
    store = Store(make_engine(db))
    run = store.get_run(callback.run_id)
    assert run.status == "done" and run.name == "lightning-run"
    evals = store.evaluations(run.id)
    assert [e.step for e in evals] == [8, 16, 24]  # 240 / 32 → 8 steps an epoch, one evaluation each
    assert all(torch.isfinite(torch.tensor(e.loo)) for e in evals)
    assert "train_loss" in evals[-1].metrics and "hess_init_share" in evals[-1].metrics
    assert float(trainer.callback_metrics["loo"]) == pytest.approx(evals[-1].loo)
    _, rows = store.examples_at(run.id, k=240, by="score")
    assert len(rows) == 240 and all(r.label in (0, 1) and r.score is not None for r in rows)


def test_early_stopping_on_the_loo_stops_the_fit_and_is_recorded(tmp_path):
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    torch.manual_seed(0)
    es = EarlyStopping(monitor="loo", patience=1, min_delta=10.0)  # no improvement of 10 nats: stops at once
    callback = IVONDiagnostics(db, "stopped", early_stopping=es)
    trainer = _trainer(callback, 20, tmp_path)
    trainer.fit(Net(), DataLoader(_data(), batch_size=32))
    assert trainer.current_epoch < 5 and es.stopped_step is not None
    stop = Store(make_engine(db)).early_stop(callback.run_id)
    assert stop.stopped_step == es.stopped_step and "did not improve" in stop.reason


def test_a_resumed_fit_continues_the_same_run(tmp_path):
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    first = IVONDiagnostics(db, "resumed")
    trainer = _trainer(first, 2, tmp_path)
    trainer.fit(Net(), DataLoader(_data(), batch_size=32))
    ckpt = trainer.checkpoint_callback.best_model_path
    second = IVONDiagnostics(db, "ignored on resume")
    _trainer(second, 3, tmp_path).fit(Net(), DataLoader(_data(), batch_size=32), ckpt_path=ckpt)
    assert second.run_id == first.run_id
    assert [e.step for e in Store(make_engine(db)).evaluations(first.run_id)] == [8, 16, 24]


def test_an_optimizer_other_than_ivon_is_refused_before_training(tmp_path):
    callback = IVONDiagnostics(f"sqlite:///{tmp_path / 'runs.db'}", "adam")
    with pytest.raises(TypeError, match="ivon_core.IVON.*Adam"):
        _trainer(callback, 1, tmp_path).fit(Net("adam"), DataLoader(_data(), batch_size=32))


def test_the_documented_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)
    out = runpy.run_path(str(script))
    store = Store(make_engine("sqlite:///ivon-diag.db"))
    assert store.get_run(out["diagnostics"].run_id).status == "done"
    assert len(store.evaluations(out["diagnostics"].run_id)) >= 1


def test_an_optuna_study_prunes_trials_on_the_loo_and_the_runs_say_so(tmp_path):
    optuna = pytest.importorskip("optuna")
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    runs = []

    def objective(trial):
        hess_init = trial.suggest_float("hess_init", 0.01, 10.0, log=True)
        net = Net()
        net.configure_optimizers = lambda: IVON(net.parameters(), lr=0.1, ess=240, hess_init=hess_init, beta2=0.99)
        callback = IVONDiagnostics(db, f"trial-{trial.number}", trial=trial)
        runs.append(callback)
        trainer = _trainer(callback, 4, tmp_path)
        trainer.fit(net, DataLoader(_data(), batch_size=32))
        return float(trainer.callback_metrics["loo"])

    # a pruner that prunes every trial after the first from its first report: the path is what is tested
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.ThresholdPruner(upper=-1.0),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=2)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.PRUNED] * 2
    store = Store(make_engine(db))
    for cb in runs:
        run = store.get_run(cb.run_id)
        assert run.status == "cancelled" and run.error.startswith("optuna: pruned at step 8")
    assert all(list(t.intermediate_values) == [8] for t in study.trials)  # reported at the first evaluation
