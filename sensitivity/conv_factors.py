"""Statistics of a Conv2d layer's unfolded input patches for K-FAC's input factor, without unfolding.

K-FAC's input factor of a convolution is the Gram Σ_t u_t u_tᵀ of its unfolded patches u_t (C·kh·kw entries per
output position t), D² = (C·kh·kw)² products per position. For stride 1 the block of kernel offsets (δ1, δ2) is a
correlation of the input with itself shifted by δ2 − δ1, summed over the positions that offset δ1 reads:
    block(δ1, δ2) = Σ_{q ∈ R(δ1)} x_q x_{q+Δ}ᵀ,   Δ = δ2 − δ1,
so the (2kh − 1)(2kw − 1) shifts (half of them, by symmetry) give every block from the whole image's correlation
minus the few border pixels outside R(δ1): ≈ 13 C² products per position for a 3×3 kernel instead of 81 C², and
no unfolded copy (tests: equal to the unfolded Gram). Strided convolutions, those with under
``SHIFT_MIN_CHANNELS`` input channels and every convolution on an accelerator keep the unfolded route: there the
shifts' many small kernels and index copies per layer and chunk cost more than they save (docs/benchmarks.md,
`bench/sensitivity.py --device cuda`).
String padding and non-zero padding modes are applied to the input first (``conv_input``), as the layer does.
"""

from __future__ import annotations

import functools
from itertools import product

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Below this many input channels the unfolded route is faster (an RGB stem, 3 × 32 × 32, 256 examples: 11 ms
# unfolded, 20 ms shifted; 4 channels: 28 and 14 ms)
SHIFT_MIN_CHANNELS = 4


def patch_gram(u: Tensor, budget: int | None = None) -> Tensor:
    """Σ_b U_b U_bᵀ for U (B, D, T) (unfolded patches, or output gradients per position), a few examples per
    batched product: the single product over (B·T, D) rows needs a transposed copy of U, which cost as much memory
    traffic as the unfolding itself (ResNet-20 K-FAC fit: 3.75 s → 2.97 s). ``budget``: elements of the per-example
    products held at once (default 2^22 on a CPU, 2^26 on an accelerator, where fewer launches matter more)."""
    b, d, _ = u.shape
    budget = budget or (1 << 22 if u.device.type == "cpu" else 1 << 26)
    step = max(1, budget // (d * d))
    out = u.new_zeros(d, d)
    for s in range(0, b, step):
        blk = u[s : s + step]
        out += torch.bmm(blk, blk.transpose(1, 2)).sum(0)
    return out


def conv_input(mod: nn.Conv2d, a: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The input as the convolution reads it, with the zero padding still to apply: string padding ("same") and
    non-zero padding modes (reflect, replicate, circular) are padded here as the layer pads them. Grouped
    convolutions are not covered (``KFACCovariance.check`` refuses them)."""
    if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        return F.pad(a, mod._reversed_padding_repeated_twice, mode=mode), (0, 0)
    return a, tuple(mod.padding)


def positions(mod: nn.Conv2d, a: Tensor, padding: tuple[int, int]) -> int:
    """Output positions of ``mod`` on ``a`` (as ``conv_input`` returns it) zero-padded by ``padding``."""
    (kh, kw), (dh, dw), (sh, sw), (ph, pw) = mod.kernel_size, mod.dilation, mod.stride, padding
    return ((a.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((a.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def patch_means(mod: nn.Conv2d, a: Tensor) -> Tensor:
    """(B, C·kh·kw): each patch entry averaged over the output positions, as unfold(a).mean(2) without unfolding."""
    a, (ph, pw) = conv_input(mod, a)
    (kh, kw), (dh, dw), (sh, sw) = mod.kernel_size, mod.dilation, mod.stride
    a = F.pad(a, (pw, pw, ph, ph))
    ho = (a.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (a.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = [a[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw].mean((2, 3))
            for i in range(kh) for j in range(kw)]
    return torch.stack(cols, 2).reshape(a.shape[0], -1)  # unfold's order: channel-major, then kernel row, column


def input_gram(mod: nn.Conv2d, a: Tensor) -> tuple[Tensor, int]:
    """Σ over examples and output positions of u_t u_tᵀ (u_t the patches ``mod`` reads from ``a``, in unfold's
    order: channel-major, then kernel row, column) and the number of positions per example."""
    a, padding = conv_input(mod, a)
    if mod.stride != (1, 1) or a.shape[1] < SHIFT_MIN_CHANNELS or a.device.type != "cpu":
        u = F.unfold(a, mod.kernel_size, mod.dilation, padding, mod.stride)  # (B, C·kh·kw, T)
        return patch_gram(u), u.shape[2]
    return _shifted_gram(a, tuple(mod.kernel_size), tuple(mod.dilation), padding), positions(mod, a, padding)


@functools.lru_cache(maxsize=64)
def _plan(h: int, w: int, kernel: tuple, dilation: tuple, padding: tuple):
    """Per shift Δ: its flat offset, the blocks (δ1, δ2) it serves, the border pixels some δ1 does not read and,
    per block, which of those pixels lie outside R(δ1)."""
    (kh, kw), (dh, dw), (ph, pw) = kernel, dilation, padding
    ho, wo = h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)
    my, mx = dh * (kh - 1), dw * (kw - 1)
    wp = w + mx  # zeros right of each row and below each image: a shift never reaches another row's pixels
    rows = [(max(dh * i - ph, 0), min(dh * i - ph + ho, h)) for i in range(kh)]
    cols = [(max(dw * j - pw, 0), min(dw * j - pw + wo, w)) for j in range(kw)]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    blocks: dict[tuple[int, int], list] = {}
    for i1, j1, i2, j2 in product(range(kh), range(kw), range(kh), range(kw)):
        blocks.setdefault((dh * (i2 - i1), dw * (j2 - j1)), []).append((i1, j1, i2 * kw + j2))
    shifts = []
    for (dy, dx), bl in blocks.items():
        outside = torch.stack([(ys < rows[i][0]) | (ys >= rows[i][1]) | (xs < cols[j][0]) | (xs >= cols[j][1])
                               for i, j, _ in bl])
        used = outside.any(0)
        shifts.append(((dy, dx), dy * wp + dx, [(i * kw + j, k2) for i, j, k2 in bl], (ys * wp + xs)[used],
                       outside[:, used]))
    return (h + my, wp, my * wp + mx), shifts


def _shifted_gram(a: Tensor, kernel: tuple, dilation: tuple, padding: tuple) -> Tensor:
    """``input_gram`` of a stride-1 convolution zero-padded by ``padding``, from shifted correlations."""
    b, c, h, w = a.shape
    kh, kw = kernel
    (hp, wp, ext), shifts = _plan(h, w, kernel, dilation, padding)
    n = b * hp * wp
    # channels-last with zero margins: every shift is a row range, every border pixel one contiguous row
    flat = a.new_zeros(ext + n + ext, c)
    flat[ext : ext + n].view(b, hp, wp, c)[:, :h, :w].copy_(a.permute(0, 2, 3, 1))
    x = flat[ext : ext + n]
    starts = (torch.arange(b, device=a.device) * (hp * wp) + ext)[None, :]
    out = a.new_empty(c, kh * kw, c, kh * kw)
    totals: dict[tuple[int, int], Tensor] = {}
    for (dy, dx), off, pairs, pix, outside in shifts:
        back = totals.get((-dy, -dx))
        total = totals[(dy, dx)] = back.T if back is not None else x.T @ flat[ext + off : ext + off + n]
        corr = None
        if pix.numel():  # the border pixels' own products, for the blocks whose R(δ1) leaves them out
            idx = (pix.to(a.device)[:, None] + starts).reshape(-1)
            xb = flat.index_select(0, idx).view(-1, b, c)
            xs = flat.index_select(0, idx + off).view(-1, b, c)
            per_pixel = torch.bmm(xb.transpose(1, 2), xs).reshape(len(pix), c * c)
            corr = (outside.to(device=a.device, dtype=a.dtype) @ per_pixel).view(-1, c, c)
        for k, (k1, k2) in enumerate(pairs):
            out[:, k1, :, k2] = total if corr is None else total - corr[k]
    return out.reshape(c * kh * kw, c * kh * kw)
