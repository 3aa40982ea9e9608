"""Memory-perturbation sensitivities, leave-one-out estimates and variance providers (torch.func)."""

from sensitivity.batch_scores import BatchScores
from sensitivity.covariance import BlockCovariance, DenseCovariance, KFACCovariance
from sensitivity.deviations import (
    DEFAULT_FORM,
    FORMS,
    SensitivityResult,
    compute_sensitivities,
    iter_sensitivities,
    resolve_form,
)
from sensitivity.influence import InfluenceResult, influence
from sensitivity.losses import LOSSES, Loss
from sensitivity.providers import provider
from sensitivity.variance import (
    Covariance,
    DiagonalCovariance,
    adamw_variance,
    ivon_variance,
    sgd_variance,
)

__all__ = [
    "compute_sensitivities", "iter_sensitivities", "SensitivityResult", "FORMS", "DEFAULT_FORM", "resolve_form",
    "Loss", "LOSSES", "Covariance", "DiagonalCovariance", "ivon_variance", "adamw_variance", "sgd_variance",
    "DenseCovariance", "KFACCovariance", "BlockCovariance", "influence", "InfluenceResult", "BatchScores",
    "provider",
]
