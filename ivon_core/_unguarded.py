"""torch's ``Optimizer`` without the dynamo guard on four of its methods.

torch wraps ``zero_grad``, ``state_dict``, ``load_state_dict`` and ``add_param_group`` so that a compiled region does
not trace them; the wrapper's first call imports ``torch._dynamo`` (and with it sympy and parts of inductor), which a
process that never compiles then holds to its end (bench/memory.py). Outside compilation these call torch's own
methods directly; under compilation, torch's guarded ones.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def _unguarded(name: str):
    guarded = getattr(Optimizer, name)
    plain = getattr(guarded, "__wrapped__", guarded)

    def method(self, *args, **kwargs):
        return (guarded if torch.compiler.is_compiling() else plain)(self, *args, **kwargs)

    method.__name__, method.__qualname__, method.__doc__ = name, f"UnguardedOptimizer.{name}", plain.__doc__
    return method


class UnguardedOptimizer(Optimizer):
    zero_grad = _unguarded("zero_grad")
    state_dict = _unguarded("state_dict")
    load_state_dict = _unguarded("load_state_dict")
    add_param_group = _unguarded("add_param_group")
