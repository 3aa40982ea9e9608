"""One training step: the one the worker's jobs take, and the validation's runs with them."""

from __future__ import annotations

import torch
from torch import nn

from ivon_core import IVON
from worker import distributed as D


def train_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 1
               ) -> tuple[float, torch.Tensor]:
    """One optimizer step over the batch, in ``micro_batches`` pieces (IVON: one weighted MC sample each); returns
    the mean loss and each example's (averaged over MC samples). Under torchrun, gradients are averaged over ranks."""
    model.train()
    pieces = [(xb, yb) for xb, yb in zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)) if len(xb)]
    per = []
    if isinstance(opt, IVON):
        for xb, yb in pieces:
            mine = 0.0
            for _ in range(opt.mc_samples):
                with opt.sampled_params(train=True, weight=len(xb)):
                    opt.zero_grad(set_to_none=True)
                    losses = nn.functional.cross_entropy(model(xb), yb, reduction="none")
                    losses.mean().backward()
                    mine = mine + losses.detach() / opt.mc_samples
            per.append(mine)
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
        for xb, yb in pieces:
            losses = nn.functional.cross_entropy(model(xb), yb, reduction="none")
            (losses.mean() * (len(xb) / len(x))).backward()
            per.append(losses.detach())
        D.average_gradients(model)
        opt.step()
    per = torch.cat(per)
    return float(per.double().mean()), per
