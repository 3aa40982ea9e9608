"""Validation of the LOO estimate and the sensitivities against retraining (`ivon-diag validate`)."""
