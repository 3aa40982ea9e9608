"""The covariance a job's sensitivities use: the optimizer's σ², or a Laplace refitted on the examples trained on."""

from __future__ import annotations

import torch
from torch import nn

from app.store.job_config import JobConfig
from ivon_core import IVON
from sensitivity import adamw_variance, ivon_variance, sgd_variance
from sensitivity.providers import registered
from worker.data import Dataset, Rows


def optimizer_variance(cfg: JobConfig, model: nn.Module, opt, data: Dataset, trained: torch.Tensor):
    """σ² from the optimizer's state (IVON, AdamW), or a diagonal Laplace refitted on the data (SGD); ``trained``:
    the training-set indices the job trains on."""
    if isinstance(opt, IVON):
        return ivon_variance(opt, model)
    if isinstance(opt, torch.optim.AdamW):
        return adamw_variance(opt, len(trained), model, weight_decay=cfg.optimizer.weight_decay)
    rows = Rows(data.xtr, data.ytr, trained, cfg.sensitivity.chunk_size)
    return sgd_variance(model, rows, prior_precision=len(trained) * cfg.optimizer.weight_decay or 1.0)


def job_variance(cfg: JobConfig, model: nn.Module, data: Dataset, optimizer_var, trained: torch.Tensor):
    """The covariance the job's ``sensitivity.covariance`` names (``sensitivity.providers``); the refitted ones over
    the examples trained on (every rank holds them: the same on each rank). ``optimizer_var``: σ² from
    ``optimizer_variance``."""
    build = registered()[cfg.sensitivity.covariance]
    chunk = cfg.sensitivity.chunk_size
    prior = len(trained) * cfg.optimizer.weight_decay or 1.0
    return build(model, Rows(data.xtr, data.ytr, trained, chunk), prior_precision=prior, chunk_size=chunk,
                 optimizer_variance=optimizer_var)
