"""Optuna on the LOO: a trial reports the LOO estimate at each evaluation and is pruned when the study's pruner
says so. Selecting hyperparameters (hess_init, weight decay, width) by the LOO needs no held-out split.

    def objective(trial):
        ...  # build the model and IVON from trial.suggest_*(...)
        for epoch in range(epochs):
            train_one_epoch()
            res = compute_sensitivities(model, train, ivon_variance(optimizer, model))
            report_loo(trial, res.loo, step=epoch)   # raises optuna.TrialPruned when pruned
        return res.loo

    optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner()).optimize(objective, 20)

With the Lightning callback: ``IVONDiagnostics(..., trial=trial)`` reports and prunes the same way.
"""

from __future__ import annotations

import math

import optuna


def report_loo(trial: optuna.Trial, loo: float, step: int) -> None:
    """Report ``loo`` as ``trial``'s intermediate value at ``step``; raise ``optuna.TrialPruned`` when the study's
    pruner prunes the trial (a non-finite LOO prunes it at once)."""
    if not math.isfinite(loo):
        raise optuna.TrialPruned(f"the LOO estimate is {loo} at step {step}")
    trial.report(float(loo), step)
    if trial.should_prune():
        raise optuna.TrialPruned(f"pruned at step {step} (LOO {loo:.4g})")
