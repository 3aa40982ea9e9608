"""sensitivity.BatchScores: gᵢᵀ V gᵢ from a step's activations and output gradients equals the per-example gradients'
V-weighted norms (torch.func), for Linear and Conv2d layers, biases, sequences and frozen layers."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from sensitivity import BatchScores
from worker import models


def _exact(model, x, y, var):
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yi.reshape(-1))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return sum((g[n] ** 2 * var[n]).flatten(1).sum(1) for n in g)


class _Sequence(nn.Module):  # a Linear applied at every position of a sequence
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


@pytest.mark.parametrize("make,shape", [(lambda: models.mlp(20, 5, (16, 8)), (20,)),
                                        (lambda: models.small_cnn(3, 5, 16), (3, 16, 16)),
                                        (lambda: _Sequence(), (4, 6))])
def test_batch_scores_equal_the_per_example_gradients_weighted_norms(make, shape):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(12, *shape, dtype=torch.float64), torch.randint(0, 3, (12,))
    var = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    with BatchScores(model, var) as bs:
        nn.functional.cross_entropy(model(x), y).backward()
    assert bs.covered == 1.0
    torch.testing.assert_close(bs.scores, _exact(model, x, y, var), rtol=1e-10, atol=1e-12)
    model.zero_grad()
    model(x).sum().backward()  # after the block: no hooks left
    assert bs.scores is not None and len(bs._handles) == 0


def test_frozen_layers_and_layers_without_hooks_are_left_out_and_said_so():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)).double()
    model[0].requires_grad_(False)
    var = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    with BatchScores(model, var) as bs:
        nn.functional.cross_entropy(model(x), y).backward()
    assert bs.covered == pytest.approx(24 / (24 + 14))  # the last Linear's 24 of the 38 trainable parameters
    model[1].requires_grad_(False)
    torch.testing.assert_close(bs.scores, _exact(model, x, y, var), rtol=1e-10, atol=1e-12)
