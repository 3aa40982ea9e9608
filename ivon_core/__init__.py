"""IVON optimizer, posterior sampling and predictive metrics (pure torch)."""

from ivon_core.metrics import accuracy, all_metrics, brier, ece, nll
from ivon_core.optimizer import IVON, matched_beta2
from ivon_core.posterior import Prediction, predict, preserved_noise

__all__ = ["IVON", "matched_beta2", "Prediction", "predict", "preserved_noise", "accuracy", "nll", "ece", "brier",
           "all_metrics"]
