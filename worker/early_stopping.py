"""Early stopping with PyTorch Lightning's names and semantics, monitoring the LOO estimate by default."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from torch import nn


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` evaluations.

    ``min_delta_se``: where the metrics carry the monitored value's standard error (``loo_se`` beside ``loo``: a
    sampled estimate), an improvement must also exceed this many standard errors, so sampling noise does not count
    as progress.
    ``check_finite``: a NaN or inf stops at once (reason given); ``stopping_threshold``: stop as soon as the
    monitored value is better than it; ``restore_best_weights``: ``restore(model)`` loads the best weights.
    """

    monitor: str = "loo"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    min_delta_se: float = 1.0
    check_finite: bool = True
    stopping_threshold: float | None = None
    restore_best_weights: bool = True
    best: float | None = None
    best_step: int | None = None
    wait: int = 0
    stopped_step: int | None = None
    reason: str | None = None
    _best_state: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"Invalid mode: {self.mode!r} (must be 'min' or 'max')")
        if self.patience < 0 or self.min_delta < 0 or self.min_delta_se < 0:
            raise ValueError("patience, min_delta and min_delta_se must be >= 0")

    def _better(self, value: float, than: float, se: float = 0.0) -> bool:
        delta = max(self.min_delta, self.min_delta_se * se if math.isfinite(se) else 0.0)
        return value < than - delta if self.mode == "min" else value > than + delta

    def step(self, metrics: dict[str, float], step: int, model: nn.Module | None = None) -> bool:
        """Record one evaluation; True when training should stop."""
        if self.monitor not in metrics:
            raise KeyError(f"early stopping monitors {self.monitor!r}, not among {sorted(metrics)}")
        value = metrics[self.monitor]
        if value is None or not math.isfinite(value):
            if self.check_finite:
                self.stopped_step, self.reason = step, f"{self.monitor} = {value} is not finite"
                return True
            return False
        se = metrics.get(f"{self.monitor}_se") or 0.0
        if self.best is None or self._better(value, self.best, se):
            self.best, self.best_step, self.wait = float(value), step, 0
            if model is not None and self.restore_best_weights:
                self._best_state = copy.deepcopy(model.state_dict())
        else:
            self.wait += 1
        if self.stopping_threshold is not None and (
                value < self.stopping_threshold if self.mode == "min" else value > self.stopping_threshold):
            self.stopped_step, self.reason = step, f"{self.monitor} = {value:.6g} reached {self.stopping_threshold}"
            return True
        if self.wait >= self.patience and self.wait > 0:
            self.stopped_step = step
            self.reason = (f"{self.monitor} did not improve for {self.wait} evaluations "
                           f"(best {self.best:.6g} at step {self.best_step})")
            return True
        return False

    def restore(self, model: nn.Module) -> bool:
        if self._best_state is None:
            return False
        model.load_state_dict(self._best_state)
        return True

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("best", "best_step", "wait", "stopped_step", "reason", "_best_state")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
