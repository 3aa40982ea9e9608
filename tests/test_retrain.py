"""The brute-force leave-one-out truth: batched Newton refits land where one L-BFGS refit per example does."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import sensitivity.retrain as retrain
from sensitivity.retrain import fit_map, leave_one_out


def _digits(n: int, seed: int = 0):
    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.tensor(x, dtype=torch.float64)[order] / 16.0, torch.tensor(y)[order]


@pytest.fixture(scope="module")
def logreg():
    x, y = _digits(400)
    torch.manual_seed(0)
    model = nn.Linear(64, 10).double()
    model.bias.requires_grad_(False)  # a frozen parameter stays where it is in both methods
    fit_map(model, x, y, prior_precision=1.0)
    return model, x, y, [0, 7, 50, 123, 399]


@pytest.fixture(scope="module")
def mlp():
    x, y = _digits(200, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    fit_map(model, x, y, prior_precision=0.6, max_iter=1000, restarts=10)
    return model, x, y, [3, 11, 42, 150]


def test_newton_matches_lbfgs_on_a_convex_problem(logreg):
    model, x, y, pick = logreg
    df_n, loss_n = leave_one_out(model, x, y, pick, method="newton")
    df_l, loss_l = leave_one_out(model, x, y, pick, method="lbfgs")
    assert df_n.shape == (len(pick), 10) and loss_n.shape == (len(pick),)
    assert torch.allclose(loss_n, loss_l, atol=1e-6) and torch.allclose(df_n, df_l, atol=1e-5)
    assert (df_n.abs().amax(1) > 1e-4).all()  # removing an example does move its prediction


def test_newton_matches_lbfgs_on_an_mlp_at_its_map(mlp):
    model, x, y, pick = mlp
    df_n, loss_n = leave_one_out(model, x, y, pick, prior_precision=0.6, method="newton")
    df_l, loss_l = leave_one_out(model, x, y, pick, prior_precision=0.6, method="lbfgs")
    assert torch.allclose(loss_n, loss_l, atol=1e-4) and torch.allclose(df_n, df_l, atol=1e-3)


def test_unconverged_newton_problems_are_finished_by_lbfgs(mlp, monkeypatch):
    model, x, y, pick = mlp
    _, loss_l = leave_one_out(model, x, y, pick, prior_precision=0.6, method="lbfgs")
    monkeypatch.setattr(retrain, "NEWTON_MAX_STEPS", 1)
    _, loss_n = leave_one_out(model, x, y, pick, prior_precision=0.6, method="newton")
    assert torch.allclose(loss_n, loss_l, atol=1e-4)


def test_a_hessian_that_is_not_positive_definite_falls_back_to_the_ggn(logreg, monkeypatch):
    model, x, y, pick = logreg
    _, loss_l = leave_one_out(model, x, y, pick, method="lbfgs")
    monkeypatch.setattr(retrain, "_inverse_hessian", lambda *a, **k: None)
    _, loss_n = leave_one_out(model, x, y, pick, method="newton")
    assert torch.allclose(loss_n, loss_l, atol=1e-6)


def test_bad_input_is_refused_and_nothing_is_empty_by_accident(logreg):
    model, x, y, _ = logreg
    with pytest.raises(ValueError, match="method: 'exact'"):
        leave_one_out(model, x, y, [0], method="exact")
    with pytest.raises(ValueError, match="index 400 is outside"):
        leave_one_out(model, x, y, [1, 400])
    df, loss = leave_one_out(model, x, y, [])
    assert df.shape == (0, 10) and loss.shape == (0,)


def test_polish_takes_the_gradient_below_newtons_tolerance_where_lbfgs_stalls():
    from sensitivity.retrain import NEWTON_GRAD_TOL, map_objective

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:150] / 16.0), torch.tensor(y[:150])

    def largest_gradient(polish):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
        fit_map(model, x, y, prior_precision=1.0, polish=polish)
        grads = torch.autograd.grad(map_objective(model, x, y), list(model.parameters()))
        return max(float(g.abs().max()) for g in grads)

    assert largest_gradient(False) > NEWTON_GRAD_TOL  # L-BFGS alone stops near 1e-6 here
    assert largest_gradient(True) < NEWTON_GRAD_TOL
