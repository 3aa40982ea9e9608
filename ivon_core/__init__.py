"""IVON optimizer, posterior sampling and predictive metrics (pure torch)."""

from ivon_core.metrics import accuracy, all_metrics, brier, ece, nll
from ivon_core.optimizer import IVON, matched_beta2
from ivon_core.posterior import Prediction, mean_probs, predict, preserved_noise

__all__ = ["IVON", "matched_beta2", "Prediction", "predict", "mean_probs", "preserved_noise", "accuracy", "nll", "ece",
           "brier", "all_metrics"]
