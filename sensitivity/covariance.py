"""Covariances with weight correlations: a dense Σ (small models or a subset of parameters, e.g. a last layer)
and a Kronecker-factored GGN Laplace (K-FAC) per Linear and Conv2d layer.

Both apply Σ to batches of per-example vectors (``apply``); parameters they do not cover count as fixed (σ² = 0).
Precision convention: the loss summed over the N training examples plus a Gaussian prior of precision
``prior_precision`` (for a mean loss with weight decay δ, that is N·δ: see ``prior_from_weight_decay``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from sensitivity.conv_factors import input_gram, patch_gram, patch_means
from sensitivity.jacobians import iter_chunks, per_example_jacobians
from sensitivity.losses import Loss, get_loss
from sensitivity.providers import provider
from sensitivity.variance import as_covariance


def prior_from_weight_decay(weight_decay: float, n_train: int) -> float:
    """Prior precision N·δ of a mean loss regularized by (δ/2)‖θ‖²."""
    return float(weight_decay) * int(n_train)


def _flat(tangents: dict[str, Tensor], names: list[str], shapes: dict[str, torch.Size]) -> tuple[Tensor, tuple]:
    lead = tangents[names[0]].shape[: tangents[names[0]].ndim - len(shapes[names[0]])]
    return torch.cat([tangents[n].reshape(*lead, -1) for n in names], -1), lead


class DenseCovariance:
    """Σ as a dense P×P matrix over the named parameters (in the order given)."""

    default_form, default_max_amplification = "corrected", 10.0  # exact with the full covariance

    def __init__(self, model: nn.Module, sigma: Tensor, params: list[str] | None = None):
        named = dict(model.named_parameters())
        self.names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
        unknown = [n for n in self.names if n not in named]
        if unknown:
            raise ValueError(f"DenseCovariance: unknown parameters {unknown}")
        self.shapes = {n: named[n].shape for n in self.names}
        size = sum(named[n].numel() for n in self.names)
        if sigma.shape != (size, size):
            raise ValueError(f"DenseCovariance: Σ has shape {tuple(sigma.shape)}, the parameters need ({size}, {size})")
        if not torch.isfinite(sigma).all():
            raise ValueError("DenseCovariance: Σ has non-finite entries")
        self.sigma = sigma.detach()

    def scaled(self, alpha: float) -> DenseCovariance:
        """αΣ."""
        out = copy.copy(self)
        out.sigma = alpha * self.sigma
        return out

    def apply(self, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {n: torch.zeros_like(t) for n, t in tangents.items() if n not in self.shapes}
        if len(out) == len(tangents):  # none of Σ's parameters: zero covariance (e.g. the body beside a head)
            return out
        flat, lead = _flat(tangents, self.names, self.shapes)
        res = flat @ self.sigma.to(flat.dtype).to(flat.device)
        pos = 0
        for n in self.names:
            k = self.shapes[n].numel()
            out[n] = res[..., pos : pos + k].reshape(*lead, *self.shapes[n])
            pos += k
        return {n: out[n] for n in tangents}

    @classmethod
    def laplace(cls, model: nn.Module, data, loss: str | Loss = "cross_entropy", prior_precision: float = 1.0,
                params: list[str] | None = None, chunk_size: int = 256, noise_var: float = 1.0) -> DenseCovariance:
        """Exact GGN Laplace: Σ = (Σ_i J_iᵀ Λ_i J_i + prior_precision I)^{-1} over ``params`` (default: all)."""
        names = _trainable(model, params)
        ggn = dense_ggn(model, data, loss, names, chunk_size, noise_var)
        ggn.diagonal().add_(prior_precision)
        return cls(model, torch.linalg.inv(0.5 * (ggn + ggn.T)), names)

    @classmethod
    def last_layer(cls, model: nn.Module, data, loss: str | Loss = "cross_entropy", prior_precision: float = 1.0,
                   chunk_size: int = 256, noise_var: float = 1.0) -> DenseCovariance:
        """Exact GGN Laplace over the last Linear layer, the rest of the network fixed (laplace-torch's default).

        ((D+1)·K)² entries for D features and K outputs: cheap for classifier heads, not for wide output layers.
        """
        names = last_layer_params(model)
        ggn = _linear_head_ggn(model, data, get_loss(loss, noise_var), chunk_size, names)
        if ggn is None:  # something follows the head: per-example Jacobians
            return cls.laplace(model, data, loss, prior_precision, names, chunk_size, noise_var)
        ggn.diagonal().add_(prior_precision)
        return cls(model, torch.linalg.inv(0.5 * (ggn + ggn.T)), names)


def _trainable(model: nn.Module, params: list[str] | None) -> list[str]:
    return list(params) if params is not None else [n for n, p in model.named_parameters() if p.requires_grad]


def dense_ggn(model: nn.Module, data, loss: str | Loss = "cross_entropy", params: list[str] | None = None,
              chunk_size: int = 256, noise_var: float = 1.0) -> Tensor:
    """Σ_i J_iᵀ Λ_i J_i over ``params`` (default: every trainable parameter, in the model's order) as a dense P×P
    matrix, from per-example Jacobians in eval mode: small models or a subset of parameters only."""

    lossf = get_loss(loss, noise_var)
    named = dict(model.named_parameters())
    names = _trainable(model, params)
    sub = {n: named[n].detach() for n in names}
    size = sum(p.numel() for p in sub.values())
    ref = next(iter(sub.values()))
    ggn = torch.zeros(size, size, dtype=ref.dtype, device=ref.device)
    was = model.training
    model.eval()
    try:
        for x, _, _ in iter_chunks(data, chunk_size, model):
            with torch.no_grad():
                logits, jac = per_example_jacobians(model, sub, x)
            j = torch.cat([jac[n].flatten(2) for n in names], 2)  # (B, K, P)
            ggn += torch.einsum("bkp,bkl,blq->pq", j, lossf.hessian(logits), j)
    finally:
        model.train(was)
    return ggn


def _linear_head_ggn(model: nn.Module, data, lossf: Loss, chunk_size: int, names: list[str]) -> Tensor | None:
    """Σ_i Λ_i ⊗ φ_i φ_iᵀ over the last Linear's (weight, bias), when the model returns that layer's output tensor
    itself: f_i's Jacobian with respect to the head is then I ⊗ φ_iᵀ and no per-example Jacobian is needed
    (one matrix product over the examples). None when the head's output is not the model's."""

    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if not names[0].endswith("weight"):
        return None
    has_bias = len(names) == 2
    seen: dict[str, Tensor] = {}
    hook = head.register_forward_hook(lambda mod, inp, out: seen.update(phi=inp[0], out=out))
    was = model.training
    model.eval()
    ggn = None
    try:
        with torch.no_grad():
            for x, _, _ in iter_chunks(data, chunk_size, model):
                out = model(x)
                if out is not seen.get("out") or out.ndim != 2 or seen["phi"].ndim != 2:
                    return None
                phi = seen["phi"]
                if has_bias:
                    phi = torch.cat([phi, torch.ones_like(phi[:, :1])], 1)
                term = torch.einsum("ikl,id,ie->kdle", lossf.hessian(out), phi, phi)  # over (k, d), (l, e)
                ggn = term if ggn is None else ggn + term
    finally:
        hook.remove()
        model.train(was)
    if ggn is None:
        return None
    k, d = ggn.shape[0], ggn.shape[1]
    ggn = ggn.reshape(k * d, k * d)
    if has_bias:  # the parameters' order: the weight row by row (d < D), then the bias (d = D)
        idx = torch.tensor([r * d + c for r in range(k) for c in range(d - 1)] + [r * d + d - 1 for r in range(k)],
                           device=ggn.device)
        ggn = ggn[idx][:, idx]
    return ggn


class BlockCovariance:
    """Σ = blockdiag(Σ_1, …, Σ_k) over disjoint parameter sets: e.g. IVON's σ² for the body and an exact
    last-layer Laplace for the head. Each block answers for the parameters it covers; ``covers[i]`` names them."""

    def __init__(self, blocks: list, covers: list[list[str]]):
        if len(blocks) != len(covers):
            raise ValueError("BlockCovariance: one list of parameter names per block")
        seen: set[str] = set()
        for names in covers:
            overlap = seen.intersection(names)
            if overlap:
                raise ValueError(f"BlockCovariance: parameters in two blocks: {sorted(overlap)[:5]}")
            seen.update(names)
        self.blocks, self.covers = list(blocks), [list(c) for c in covers]

    @classmethod
    def with_last_layer(cls, model: nn.Module, body_variance, head: DenseCovariance) -> BlockCovariance:
        """``body_variance`` (σ² or a covariance) for every parameter but the head's, ``head`` for the head."""

        body = [n for n, _ in model.named_parameters() if n not in head.names]
        return cls([as_covariance(model, body_variance), head], [body, head.names])

    def scaled(self, alpha: float) -> BlockCovariance:
        """αΣ: every block scaled."""
        return BlockCovariance([b.scaled(alpha) for b in self.blocks], self.covers)

    def apply(self, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {n: torch.zeros_like(t) for n, t in tangents.items()}
        for block, names in zip(self.blocks, self.covers):
            part = {n: tangents[n] for n in names if n in tangents}
            if part:
                out.update(block.apply(part))
        return out


def last_layer_params(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of the model's last ``nn.Linear`` (in registration order)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("last_layer_params: the model has no nn.Linear layer")
    name, mod = linears[-1]
    prefix = f"{name}." if name else ""
    return [prefix + k for k, p in mod.named_parameters(recurse=False) if p.requires_grad]


class KFACCovariance:
    """Kronecker-factored GGN Laplace: per layer, precision ≈ A ⊗ G + prior_precision I.

    A = (1/(N T)) Σ_{i,t} a_it a_itᵀ over the layer's inputs (with a 1 for the bias, T spatial positions
    for convolutions), G = Σ_{i,t} b_it b_itᵀ over the output gradients of Λ_i^{1/2} directions: all K of
    them (``mc_samples=None``, exact GGN factors) or Monte Carlo Λ_i^{1/2} z, z ~ N(0, I) (one backward).

    Convolutions: ``conv="expand"`` sums over positions as above (Grosse & Martens 2016); ``conv="reduce"``
    (Eschenhagen et al. 2023) first averages a_it over positions and sums b_it over them, A = (1/N) Σ_i ā_i ā_iᵀ,
    G = Σ_i b̄_i b̄_iᵀ: the two agree when T = 1; reduce avoids the (B·T) × (C·kh·kw) unfolded matrix product,
    which costs about kh·kw times the convolution itself.
    """

    CONV_MODES = ("expand", "reduce")

    def __init__(self) -> None:
        self.layers: dict[str, dict] = {}  # module name → factors
        self.conv = "expand"

    @staticmethod
    def check(model: nn.Module) -> None:
        """Refuse a model with layers K-FAC does not cover correctly (ValueError naming the layer)."""
        for n, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and m.groups != 1 and m.weight.requires_grad:
                raise ValueError(f"K-FAC: layer {n!r} is a grouped convolution (groups={m.groups}), whose factors "
                                 "are per group: not supported; use a diagonal covariance")

    @classmethod
    def fit(cls, model: nn.Module, data, loss: str | Loss = "cross_entropy", prior_precision: float = 1.0,
            mc_samples: int | None = 1, chunk_size: int = 256, noise_var: float = 1.0,
            generator: torch.Generator | None = None, conv: str = "expand") -> KFACCovariance:

        if not prior_precision > 0:
            raise ValueError(f"Invalid prior_precision: {prior_precision!r} (must be > 0)")
        if conv not in cls.CONV_MODES:
            raise ValueError(f"Invalid conv: {conv!r} (must be one of {cls.CONV_MODES})")
        lossf = get_loss(loss, noise_var)
        self = cls()
        self.conv = conv
        cls.check(model)
        mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                and m.weight.requires_grad}
        acts: dict[str, Tensor] = {}
        outs: dict[str, Tensor] = {}
        stats = {n: {"A": None, "G": None, "T": 1} for n in mods}

        versions: dict[str, tuple[int, int]] = {}
        copy = [False]  # set where the model changes a layer's input or output in place: it goes on with copies

        def fwd_hook(name):
            def hook(mod, inp, out):
                acts[name], outs[name] = inp[0].detach(), out
                versions[name] = (acts[name]._version, out._version)
                if copy[0]:
                    acts[name] = acts[name].clone()
                    return out.clone()
                return None
            return hook

        handles = [m.register_forward_hook(fwd_hook(n)) for n, m in mods.items()]
        n_total = 0
        was = model.training
        model.eval()
        try:
            for x, _, _ in iter_chunks(data, chunk_size, model):
                n_total += x.shape[0]
                with torch.enable_grad():
                    logits = model(x)
                    if not copy[0] and any((acts[n]._version, outs[n]._version) != versions[n] for n in acts):
                        copy[0] = True
                        logits = model(x)
                    root = lossf.hessian_factor(logits.detach())  # columns r_k: Σ_k r_k r_kᵀ = Λ
                    if mc_samples is None:
                        dirs = [root[:, :, k] for k in range(root.shape[2])]
                    else:
                        dirs = []
                        for _ in range(mc_samples):
                            z = torch.randn(root.shape[0], root.shape[2], 1, dtype=root.dtype, device=root.device,
                                            generator=generator)
                            dirs.append((root @ z)[:, :, 0] / mc_samples**0.5)
                    names = list(mods)
                    for d_i, d in enumerate(dirs):
                        grads = torch.autograd.grad(logits, [outs[n] for n in names], d,
                                                    retain_graph=d_i < len(dirs) - 1)
                        for n, g in zip(names, grads):
                            self._accumulate_g(stats[n], mods[n], g)
                for n in names:
                    self._accumulate_a(stats[n], mods[n], acts[n])
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        for n, m in mods.items():
            st = stats[n]
            a = st["A"] / max(n_total * st["T"], 1)
            la, qa = torch.linalg.eigh(0.5 * (a + a.T))
            lg, qg = torch.linalg.eigh(0.5 * (st["G"] + st["G"].T))
            self.layers[n] = {"qa": qa, "la": la.clamp_min(0), "qg": qg, "lg": lg.clamp_min(0),
                              "bias": m.bias is not None and m.bias.requires_grad, "shape": m.weight.shape,
                              "prior": float(prior_precision)}
        return self

    def _inputs(self, mod: nn.Module, a: Tensor) -> Tensor:
        """Rows ā_i under conv="reduce", a's rows for a Linear layer (with a trailing 1 when it has a bias)."""
        a = patch_means(mod, a) if isinstance(mod, nn.Conv2d) else a.reshape(-1, a.shape[-1])
        if mod.bias is not None:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        return a

    def _accumulate_a(self, st: dict, mod: nn.Module, a: Tensor) -> None:
        if isinstance(mod, nn.Conv2d) and self.conv == "expand":
            aa, st["T"] = input_gram(mod, a)
            means = patch_means(mod, a) if mod.bias is not None else None
            if means is not None:  # the rows' trailing 1: sums of the patches and their count
                s = means.sum(0) * st["T"]
                count = s.new_full((1,), float(a.shape[0] * st["T"]))
                aa = torch.cat([torch.cat([aa, s[:, None]], 1), torch.cat([s, count])[None]], 0)
        else:
            rows = self._inputs(mod, a)
            aa = rows.T @ rows
        st["A"] = aa if st["A"] is None else st["A"] + aa

    def _accumulate_g(self, st: dict, mod: nn.Module, g: Tensor) -> None:
        if isinstance(mod, nn.Conv2d) and self.conv == "expand":
            gg = patch_gram(g.reshape(g.shape[0], g.shape[1], -1))
        else:
            rows = g.sum((2, 3)) if isinstance(mod, nn.Conv2d) else g.reshape(-1, g.shape[-1])
            gg = rows.T @ rows
        st["G"] = gg if st["G"] is None else st["G"] + gg

    def scaled(self, alpha: float) -> KFACCovariance:
        """αΣ = ((A ⊗ G) / α + prior / α)⁻¹: the eigenvalues of G and the prior divided by α."""
        out = copy.copy(self)
        out.layers = {name: {**f, "lg": f["lg"] / alpha, "prior": f["prior"] / alpha}
                      for name, f in self.layers.items()}
        return out

    def apply(self, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, t in tangents.items():
            mod_name, _, kind = name.rpartition(".")
            if mod_name not in self.layers or kind not in ("weight", "bias"):
                out[name] = torch.zeros_like(t)
        for mod_name, f in self.layers.items():
            prefix = f"{mod_name}." if mod_name else ""
            wname, bname = prefix + "weight", prefix + "bias"
            if wname not in tangents:
                continue
            w = tangents[wname]
            lead = w.shape[: w.ndim - len(f["shape"])]
            m = w.reshape(*lead, f["shape"][0], -1)
            if f["bias"]:
                m = torch.cat([m, tangents[bname][..., None]], -1)
            qa, qg = f["qa"].to(m.dtype), f["qg"].to(m.dtype)
            inner = qg.T @ m @ qa
            inner = inner / (f["lg"].to(m.dtype)[:, None] * f["la"].to(m.dtype)[None, :] + f["prior"])
            res = qg @ inner @ qa.T
            if f["bias"]:
                out[bname] = res[..., -1]
                res = res[..., :-1]
            out[wname] = res.reshape(w.shape)
        return {n: out[n] for n in tangents}


# What a job's config may name (sensitivity.providers): each refitted on the examples the job trains on.
@provider("last_layer")
def _job_last_layer(model, data, *, prior_precision, chunk_size, optimizer_variance):
    """An exact GGN Laplace over the last Linear layer, the body fixed."""
    return DenseCovariance.last_layer(model, data, prior_precision=prior_precision, chunk_size=chunk_size)


@provider("optimizer_with_last_layer")
def _job_optimizer_with_last_layer(model, data, *, prior_precision, chunk_size, optimizer_variance):
    """The optimizer's σ² for the body, the last layer's exact Laplace for the head."""
    head = _job_last_layer(model, data, prior_precision=prior_precision, chunk_size=chunk_size,
                           optimizer_variance=optimizer_variance)
    return BlockCovariance.with_last_layer(model, optimizer_variance, head)


@provider("kfac")
def _job_kfac(model, data, *, prior_precision, chunk_size, optimizer_variance):
    """A K-FAC GGN Laplace over every Linear and Conv2d layer (exact expected factors, no sampling)."""
    return KFACCovariance.fit(model, data, prior_precision=prior_precision, mc_samples=None, chunk_size=chunk_size)
