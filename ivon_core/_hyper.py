"""IVON's hyperparameters: the checks, and the number types taken (as ivon-opt takes them)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor


def check(name: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (must be {rule})")


def real(name: str, value: Any, finite: bool = True) -> float:
    """A hyperparameter as a float: Python and numpy numbers and one-element tensors, as ivon-opt takes them."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    check(name, value, isinstance(value, numbers.Real) and not isinstance(value, bool), "a real number")
    value = float(value)
    check(name, value, math.isfinite(value) or not finite and value == math.inf, "finite")
    return value


RULES = {  # group hyperparameter: (test, rule)
    "lr": (lambda v: v >= 0.0, ">= 0"), "ess": (lambda v: v > 0.0, "> 0"), "hess_init": (lambda v: v > 0.0, "> 0"),
    "beta1": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"), "beta2": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0.0, ">= 0"), "clip_radius": (lambda v: v > 0.0, "> 0"),
}
