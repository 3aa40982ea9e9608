"""IVON on sklearn's digits: accuracy and calibration goals of the optimizer issue."""

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from ivon_core import IVON, accuracy, nll, predict


@pytest.mark.parametrize("noise", ["torch", "counter"])
def test_digits_mlp_reaches_096_and_mc_nll_is_no_worse_than_mean(noise):
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.2, stratify=y, random_state=0)
    xtr, xte = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = IVON(model.parameters(), lr=0.5, ess=len(xtr), hess_init=0.3, weight_decay=1e-4, noise=noise)
    epochs, batch = 30, 64
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(xtr) + batch - 1) // batch))
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr)).split(batch):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            sched.step()
    pred = predict(model, (xte, yte), opt, mc_samples=32)
    assert accuracy(pred.mean, yte) >= 0.96
    assert nll(pred.mc, yte) <= nll(pred.mean, yte) + 0.01
