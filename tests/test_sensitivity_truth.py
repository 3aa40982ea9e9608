"""Against true retraining: logistic regression on digits at its MAP, 20 examples removed one by one."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from sensitivity import compute_sensitivities
from sensitivity.covariance import DenseCovariance
from sensitivity.retrain import fit_map, leave_one_out

PRIOR = 1.0


@pytest.fixture(scope="module")
def digits_map():
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)[:1200]
    x = torch.tensor(x, dtype=torch.float64)[order] / 16.0
    y = torch.tensor(y)[order]
    torch.manual_seed(0)
    model = nn.Linear(64, 10).double()
    fit_map(model, x, y, prior_precision=PRIOR)
    pick = torch.randperm(len(x), generator=g)[:20].tolist()
    true_df, true_loss = leave_one_out(model, x, y, pick, prior_precision=PRIOR)
    return model, x, y, pick, true_df, true_loss


def _pearson(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_corrected_form_with_exact_laplace_matches_retraining(digits_map):
    model, x, y, pick, true_df, true_loss = digits_map
    cov = DenseCovariance.laplace(model, (x, y), prior_precision=PRIOR)
    res = compute_sensitivities(model, (x[pick], y[pick]), cov, form="corrected")
    assert _pearson(res.deviations, true_df) >= 0.95
    assert abs(res.loo - float(true_loss.mean())) <= 0.10 * float(true_loss.mean())
    first = compute_sensitivities(model, (x[pick], y[pick]), cov, form="first_order")
    # the first-order form underestimates the leave-one-out loss
    assert first.loo < res.loo
