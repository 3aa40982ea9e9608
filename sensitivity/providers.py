"""The covariances a training job names in its config (``sensitivity.covariance``): name → builder.

A builder turns the model at its mean, the examples it trained on and the optimizer's own σ² into a covariance:
``builder(model, data, *, prior_precision, chunk_size, optimizer_variance)``. A provider registers its builder with
``@provider("name")`` in its own module of this package; every module here is imported on first use, so a new
provider is one file (plus its name in the job schema, ``app.store.job_config.COVARIANCES``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

_BUILDERS: dict[str, Callable] = {}
_SCANNED = False


def provider(name: str) -> Callable[[Callable], Callable]:
    """Register ``builder`` under ``name`` (a second provider of the same name is refused)."""

    def register(builder: Callable) -> Callable:
        if _BUILDERS.get(name, builder) is not builder:
            raise ValueError(f"covariance provider {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return register


def registered() -> dict[str, Callable]:
    """Every registered builder, by name, after importing each module of this package once."""
    global _SCANNED
    if not _SCANNED:
        for module in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
            importlib.import_module(f"{__package__}.{module.name}")
        _SCANNED = True
    return dict(_BUILDERS)
