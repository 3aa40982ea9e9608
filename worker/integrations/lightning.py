"""A PyTorch Lightning callback: a LightningModule trained with IVON gets the LOO estimate, per-example scores and
early stopping on the LOO, written to the store and shown on the dashboard; its training step is unchanged.

    from ivon_core import IVON
    from worker.integrations.lightning import IVONDiagnostics

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return IVON(self.parameters(), lr=0.2, ess=len(train_set))  # automatic optimization works as is

    trainer = L.Trainer(max_epochs=20, callbacks=[IVONDiagnostics("sqlite:///ivon-diag.db", "my-run")])
    trainer.fit(Model(), train_loader)

The callback also logs ``loo`` to Lightning, so Lightning's own ``EarlyStopping`` and ``ModelCheckpoint`` can
monitor it. Training data: ``train_data`` ((inputs, targets) tensors or a map-style Dataset of (input, target)
pairs), else the dataset of the trainer's training loader, read in order (example i is the dataset's item i).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sensitivity import compute_sensitivities, ivon_variance
from worker.early_stopping import EarlyStopping
from worker.tracker import Tracker


class IVONDiagnostics(pl.Callback):
    """Evaluate every ``every_n_epochs`` training epochs (or every ``every_n_steps`` optimizer steps) on rank 0.

    ``module``: the attribute of the LightningModule that maps a batch's inputs to logits (default: the module).
    ``early_stopping``: stop the fit when the LOO (or another monitored metric, Lightning's logged metrics
    included) stops improving; the best weights are restored at the end when it says so.
    ``trial``: an Optuna trial; each evaluation reports the LOO to it and a pruned trial ends the fit with
    ``optuna.TrialPruned`` (``worker.integrations.optuna``), the run marked cancelled with the reason.
    """

    def __init__(self, db: str | None, name: str, *, train_data: Any = None, module: str | None = None,
                 every_n_epochs: int = 1, every_n_steps: int | None = None, form: str = "auto",
                 chunk_size: int = 256, max_amplification: float | str | None = "auto",
                 early_stopping: EarlyStopping | None = None, config: dict | None = None, trial: Any = None):
        if every_n_epochs < 1 or (every_n_steps is not None and every_n_steps < 1):
            raise ValueError("every_n_epochs and every_n_steps must be >= 1")
        self.db, self.name, self.config = db, name, dict(config or {})
        self.train_data, self.module = train_data, module
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.options = dict(form=form, chunk_size=chunk_size, max_amplification=max_amplification)
        self.early_stopping = early_stopping
        self.trial = trial
        self.tracker: Tracker | None = None
        self.run_id: int | None = None
        self._logged_examples = False
        self._last_step = -1

    # ------------------------------------------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._optimizer(trainer)  # fail before training, not at the first evaluation
        if trainer.is_global_zero:
            self.tracker = Tracker(self.db, self.name, self.config, run_id=self.run_id)
            self.run_id = self.tracker.run_id

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        es = self.early_stopping
        if es is not None and es.stopped_step is not None and es.restore_best_weights:
            es.restore(self._net(pl_module))
        if self.tracker is not None:
            self.tracker.finish("done")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.tracker is not None:
            pruned = type(exception).__name__ == "TrialPruned"
            stopped = pruned or isinstance(exception, KeyboardInterrupt)
            self.tracker.finish("cancelled" if stopped else "failed",
                                error=f"optuna: {exception}" if pruned else
                                None if stopped else f"{type(exception).__name__}: {exception}")

    def state_dict(self) -> dict[str, Any]:  # saved in Lightning's checkpoints: a resumed fit logs to the same run
        return {"run_id": self.run_id, "logged_examples": self._logged_examples,
                "early_stopping": None if self.early_stopping is None else self.early_stopping.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_id = state_dict.get("run_id")
        self._logged_examples = bool(state_dict.get("logged_examples"))
        if self.early_stopping is not None and state_dict.get("early_stopping"):
            self.early_stopping.load_state_dict(state_dict["early_stopping"])

    # ------------------------------------------------------------------------------------------------ evaluation
    def _optimizer(self, trainer: pl.Trainer):
        opts = [o for o in trainer.optimizers if hasattr(o, "param_groups") and "hess" in o.param_groups[0]]
        if not opts:
            got = ", ".join(type(o).__name__ for o in trainer.optimizers) or "none"
            raise TypeError(f"IVONDiagnostics needs configure_optimizers to return ivon_core.IVON (got {got})")
        return opts[0]

    def _net(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        net = getattr(pl_module, self.module, None)
        if not isinstance(net, nn.Module):
            raise AttributeError(f"IVONDiagnostics(module={self.module!r}): the LightningModule has no such module")
        return net

    def _data(self, trainer: pl.Trainer):
        data = self.train_data
        if data is None:
            loader = trainer.train_dataloader
            data = getattr(loader, "dataset", None)
            if data is None:
                raise ValueError("IVONDiagnostics: pass train_data= (the trainer's training loader has no dataset)")
        if isinstance(data, Dataset):
            return DataLoader(data, batch_size=self.options["chunk_size"], shuffle=False)
        return data

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = step = trainer.global_step
        outcome = self._evaluate_here(trainer, pl_module, step) if trainer.is_global_zero else None
        stop, loo = trainer.strategy.broadcast(outcome, src=0)  # every rank logs and stops alike
        pl_module.log("loo", loo)
        if self.trial is not None:
            from worker.integrations.optuna import report_loo

            report_loo(self.trial, loo, step)  # every rank: a pruned trial raises on each
        if stop:
            trainer.should_stop = True

    def _evaluate_here(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> tuple[bool, float]:
        net, opt = self._net(pl_module), self._optimizer(trainer)
        was_training = net.training
        net.eval()
        try:
            res = compute_sensitivities(net, self._data(trainer), ivon_variance(opt, net), **self.options)
        finally:
            net.train(was_training)
        if not self._logged_examples:
            labels = res.targets.tolist() if res.targets.ndim == 1 else None
            self.tracker.log_examples(labels=labels, indices=res.indices.tolist())
            self._logged_examples = True
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if k != "loo" and torch.as_tensor(v).numel() == 1 and math.isfinite(float(v))}
        epoch = trainer.current_epoch + (0.0 if self.every_n_steps else 1.0)
        self.tracker.log_evaluation(step, res, metrics=logged, epoch=epoch, optimizer=opt)
        es = self.early_stopping
        if es is None:
            return False, res.loo
        stop = es.step({**logged, "loo": res.loo}, step, net)
        self.tracker.store.save_early_stop(self.run_id, monitor=es.monitor, mode=es.mode, best=es.best,
                                           best_step=es.best_step, wait=es.wait, stopped_step=es.stopped_step,
                                           reason=es.reason)
        return stop, res.loo
