import math

import pytest
import torch
from torch import nn

from ivon_core import IVON, accuracy, all_metrics, brier, ece, mean_probs, nll, posterior, predict


def test_metrics_on_known_probabilities():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = torch.tensor([0, 1, 1, 1])
    assert accuracy(probs, y) == pytest.approx(0.75)
    assert nll(probs, y) == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.7)) / 4)
    assert brier(probs, y) == pytest.approx((0.02 + 0.08 + 0.72 + 0.18) / 4)
    # bins of width 1/15: confidences 0.9, 0.8, 0.6, 0.7 fall in separate bins; |acc - conf| summed / N
    assert ece(probs, y) == pytest.approx((0.1 + 0.2 + 0.6 + 0.3) / 4)


def test_perfectly_calibrated_predictions_have_zero_ece():
    probs = torch.tensor([[0.5, 0.5]] * 4)
    y = torch.tensor([0, 1, 0, 1])
    assert ece(probs, y) == pytest.approx(0.0)
    assert set(all_metrics(probs, y)) == {"accuracy", "nll", "ece", "brier"}


def test_metrics_reject_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="targets must lie"):
        nll(torch.full((2, 3), 1 / 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="expected probs"):
        accuracy(torch.ones(3), torch.tensor([0, 1, 2]))


def test_predict_averages_samples_and_keeps_mean_and_mode():
    model = nn.Sequential(nn.Linear(4, 3))
    model.train()
    opt = IVON(model.parameters(), lr=0.1, ess=2.0, hess_init=1.0)
    x = torch.randn(20, 4)
    before = model[0].weight.detach().clone()
    pred = predict(model, (x, torch.zeros(20, dtype=torch.long)), opt, mc_samples=50)
    assert model.training and torch.equal(model[0].weight, before)
    assert torch.allclose(pred.mean, torch.softmax(model(x), -1).detach())
    assert torch.allclose(pred.mc.sum(1), torch.ones(20))
    assert not torch.allclose(pred.mc, pred.mean, atol=1e-3)  # σ² = 0.5: samples spread
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(20, dtype=torch.long)),
                                         batch_size=7)
    assert predict(model, loader, opt, mc_samples=2).mc.shape == (20, 3)
    with pytest.raises(ValueError, match="mc_samples"):
        predict(model, x, opt, mc_samples=0)


def test_mean_probs_match_one_forward_across_chunks_and_leave_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    model.train()
    x = torch.randn(posterior.IMAGE_CHUNK * 2 + 3, 3, 8, 8)  # two full chunks and a remainder
    got = mean_probs(model, x)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(got, torch.softmax(model(x), -1))
    opt = IVON(model.parameters(), lr=0.1, ess=100.0)
    torch.testing.assert_close(predict(model, x, opt, mc_samples=1).mean, got)


def test_mean_probs_names_a_bad_input():
    with pytest.raises(TypeError, match="x must be a tensor of inputs, got list"):
        mean_probs(nn.Linear(2, 2), [[0.0, 1.0]])
