"""ivon-opt checkpoints: loading one into ``IVON`` and writing one that ivon-opt 0.1.3 loads.

ivon-opt keeps one flat Hessian and momentum vector per parameter group inside ``param_groups`` (frozen parameters
included) and its pending gradient samples in ``state``; it does not save its step count (``current_step``).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from ivon_core._hyper import check

_GROUP_KEYS = ("lr", "mc_samples", "beta1", "beta2", "weight_decay", "hess_init", "ess", "clip_radius")


def is_ivon_opt(state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` was written by ivon-opt's ``IVON`` (or by ``to_ivon_opt``)."""
    groups = state_dict.get("param_groups") or []
    return bool(groups) and "count" in state_dict.get("state", {}) and all("hess" in g for g in groups)


def from_ivon_opt(state_dict: dict[str, Any], param_groups: list[dict], debias: bool) -> dict[str, Any]:
    """ivon-opt's state_dict in this package's layout (per-parameter ``hess``, ``momentum``, ``step``), for the
    optimizer whose ``param_groups`` are given. The step count comes from ``state_dict["current_step"]``, which
    ivon-opt does not write: set it before loading (with ``debias=False`` the update does not depend on it)."""
    pending = state_dict["state"].get("count") or 0
    if pending:
        raise ValueError(f"the ivon-opt state_dict holds {pending} gradient sample(s) that step() has not applied; "
                         "save it after step()")
    step = state_dict.get("current_step")
    if step is None and debias:
        raise ValueError("an ivon-opt state_dict does not record its step count (ivon-opt keeps it in "
                         "optimizer.current_step, outside the state_dict): set state_dict['current_step'] = "
                         "<steps taken> before loading it; the debiased update depends on it")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this optimizer has {len(param_groups)}")
    state: dict[int, dict[str, Any]] = {}
    groups = []
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        ps = group["params"]
        if len(saved["params"]) != len(ps):
            raise ValueError(f"parameter group {gi}: state_dict has {len(saved['params'])} parameters, "
                             f"this optimizer has {len(ps)}")
        n = sum(p.numel() for p in ps)
        for key in ("hess", "momentum"):
            if not isinstance(saved.get(key), torch.Tensor) or saved[key].numel() != n:
                got = saved[key].numel() if isinstance(saved.get(key), torch.Tensor) else type(saved.get(key)).__name__
                raise ValueError(f"parameter group {gi}: ivon-opt's {key!r} holds {got} values, this group's "
                                 f"parameters have {n}")
        offset = 0
        for pid, p in zip(saved["params"], ps):
            k = p.numel()
            if p.requires_grad:  # a frozen parameter holds no state here (ivon-opt decays and samples it)
                state[pid] = {
                    "step": torch.tensor(float(step or 0), dtype=torch.float32),
                    "hess": saved["hess"][offset : offset + k].reshape(p.shape).clone(),
                    "momentum": saved["momentum"][offset : offset + k].reshape(p.shape).clone(),
                }
            offset += k
        groups.append({k: v for k, v in saved.items() if k not in ("hess", "momentum", "numel")})
    return {"state": state, "param_groups": groups}


def to_ivon_opt(optimizer) -> dict[str, Any]:
    """A state_dict that ivon-opt 0.1.3's ``IVON.load_state_dict`` takes for the same parameters (one device, one
    dtype, as ivon-opt requires), with ``current_step`` beside it: ivon-opt ignores that key, so set
    ``ivon_opt.current_step = state_dict["current_step"]`` after loading. Frozen parameters get ivon-opt's initial
    values (hess_init, zero momentum)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    layouts = {(p.device, p.dtype) for p in params}
    if len(layouts) > 1:
        raise ValueError(f"ivon-opt takes parameters of one device and dtype, these have {sorted(map(str, layouts))}")
    groups, pid = [], 0
    for group in optimizer.param_groups:
        hess, momentum = [], []
        for p in group["params"]:
            st = optimizer.state.get(p) or {}
            h = st.get("hess")
            hess.append((torch.full_like(p, float(group["hess_init"])) if h is None else h).detach().reshape(-1))
            m = st.get("momentum")
            momentum.append((torch.zeros_like(p) if m is None else m).detach().reshape(-1))
        out = {k: group[k] for k in _GROUP_KEYS if k in group}
        out["mc_samples"] = optimizer.mc_samples
        out["numel"] = sum(p.numel() for p in group["params"])
        dtype = group["params"][0].dtype if group["params"] else torch.get_default_dtype()
        out["momentum"] = torch.cat(momentum).to(dtype) if momentum else torch.zeros(0, dtype=dtype)
        out["hess"] = torch.cat(hess).to(dtype) if hess else torch.zeros(0, dtype=dtype)
        out["params"] = list(range(pid, pid + len(group["params"])))
        pid += len(group["params"])
        groups.append(out)
    return {"state": {"count": 0, "avg_grad": None, "avg_nxg": None, "avg_gsq": None},
            "param_groups": groups, "current_step": optimizer.current_step}


class IvonOptCompat:
    """ivon-opt's attributes on ``ivon_core.IVON`` (mixed in), for code written against ivon-opt."""

    @property
    def current_step(self) -> int:
        """Steps taken (ivon-opt's attribute); saved with the state, unlike ivon-opt's. Setting it sets every
        parameter's step count (after loading an ivon-opt checkpoint, say)."""
        steps = [int(st["step"]) for st in self.state.values() if "step" in st]
        return max(steps, default=0)

    @current_step.setter
    def current_step(self, value: int) -> None:
        check("current_step", value, isinstance(value, numbers.Integral) and value >= 0, "an int >= 0")
        for _, p in self._trainable():
            self.state[p]["step"].fill_(float(value))

    @property
    def _numel(self) -> int:  # ivon-opt's attributes, for code that reads them
        return sum(g["numel"] for g in self.param_groups)

    @property
    def _device(self) -> torch.device:
        return next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))

    @property
    def _dtype(self) -> torch.dtype:
        return next((p.dtype for g in self.param_groups for p in g["params"]), torch.get_default_dtype())

    def ivon_opt_state_dict(self) -> dict[str, Any]:
        """The state as ivon-opt 0.1.3 saves it, for its ``load_state_dict`` (``ivon_core.compat.to_ivon_opt``)."""
        return to_ivon_opt(self)
