"""IVON optimizer, posterior sampling and predictive metrics (pure torch)."""

from ivon_core.metrics import accuracy, all_metrics, brier, ece, nll
from ivon_core.optimizer import IVON
from ivon_core.posterior import Prediction, predict

__all__ = ["IVON", "Prediction", "predict", "accuracy", "nll", "ece", "brier", "all_metrics"]
