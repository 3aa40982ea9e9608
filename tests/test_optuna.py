"""Optuna (the real package) pruning on the LOO from a plain training loop."""

import math
import re
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

optuna = pytest.importorskip("optuna")

from ivon_core import IVON  # noqa: E402
from sensitivity import compute_sensitivities, ivon_variance  # noqa: E402
from worker.integrations.optuna import report_loo  # noqa: E402


def test_the_median_pruner_prunes_a_trial_whose_loo_is_worse():
    values = {0: [1.0, 0.9, 0.8], 1: [2.0, 1.9, 1.8], 2: [0.5, 0.4, 0.3]}

    def objective(trial):
        for step, loo in enumerate(values[trial.number]):
            report_loo(trial, loo, step)
        return loo

    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    study.optimize(objective, n_trials=3)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert study.best_value == 0.3


def test_a_non_finite_loo_prunes_at_once_saying_so():
    study = optuna.create_study()
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match="nan at step 4"):
        report_loo(trial, math.nan, 4)


def test_a_study_selects_hess_init_by_the_loo_of_real_runs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = (x[:, 0] > 0).long()

    def objective(trial):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = IVON(model.parameters(), lr=0.1, ess=200, beta2=0.99,
                   hess_init=trial.suggest_categorical("hess_init", [0.01, 1.0]))
        for epoch in range(3):
            for b in torch.randperm(200, generator=g).split(40):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
            res = compute_sensitivities(model, (x, y), ivon_variance(opt, model))
            report_loo(trial, res.loo, epoch)
        return res.loo

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.BruteForceSampler())
    study.optimize(objective, n_trials=2)
    assert {t.params["hess_init"] for t in study.trials} == {0.01, 1.0}
    assert all(len(t.intermediate_values) == 3 and math.isfinite(t.value) for t in study.trials)
    assert study.best_value == min(t.value for t in study.trials)


def test_the_documented_example_runs(tmp_path, capsys):
    doc = Path(__file__).parents[1] / "docs" / "integrations" / "optuna.md"
    script = tmp_path / "example.py"
    script.write_text(re.search(r"```python\n(.*?)```", doc.read_text(), re.S).group(1))
    study = runpy.run_path(str(script))["study"]
    assert len(study.trials) == 4 and math.isfinite(study.best_value)
    assert "best {'hess_init'" in capsys.readouterr().out
