"""Clipping-range estimators: min/max, Lp-error search, ACIQ. Pure functions over rows.

Each takes ``x`` of shape ``G x n`` (one row per scale group) and returns ``(lo, hi)`` of
shape ``G``; ``qparams_from_range`` turns them into scale and zero point.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import LowbitError
from .uniform import int_range, qparams_from_range

# ACIQ (Banner et al.): MSE-optimal clip alpha / b for Laplace(b) and alpha / sigma for a
# Gaussian, 2..8 bits; outside that range we extrapolate linearly (about +1.2 b per bit).
ACIQ_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}
ACIQ_GAUSS = {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92}


def aciq_alpha(bits: int, dist: str = "laplace") -> float:
    """Optimal clip in units of b (Laplace) or sigma (Gaussian) for a ``bits``-wide code."""
    table = {"laplace": ACIQ_LAPLACE, "gauss": ACIQ_GAUSS}.get(dist)
    if table is None:
        raise LowbitError(f"ACIQ distribution must be 'laplace' or 'gauss', got {dist!r}")
    if bits in table:
        return table[bits]
    lo_b, hi_b = min(table), max(table)
    edge = lo_b if bits < lo_b else hi_b
    step = table[lo_b + 1] - table[lo_b] if bits < lo_b else table[hi_b] - table[hi_b - 1]
    return max(table[edge] + (bits - edge) * step, 0.5)


def minmax_range(x: Tensor, **_) -> tuple[Tensor, Tensor]:
    """Full observed range per row."""
    return x.amin(1), x.amax(1)


def lp_search_range(x: Tensor, bits: int, signed: bool, symmetric: bool, narrow: bool = False,
                    p: float = 2.0, candidates: int = 100, shrink: float = 0.01) -> tuple[Tensor, Tensor]:
    """Shrink the min/max range in steps of ``shrink`` and keep, per row, the one with least Lp error."""
    lo0, hi0 = x.amin(1), x.amax(1)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    qmin, qmax = int_range(bits, True, narrow) if signed and symmetric else int_range(bits, False)
    for i in range(candidates):
        ratio = 1.0 - shrink * i
        if ratio <= 0:
            break
        lo, hi = lo0 * ratio, hi0 * ratio
        scale, zp = qparams_from_range(lo, hi, bits, signed, symmetric, narrow)
        s, z = scale.unsqueeze(1), zp.unsqueeze(1)
        q = (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s
        err = (q - x).abs().pow(p).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def aciq_range(x: Tensor, bits: int, signed: bool, symmetric: bool, narrow: bool = False,
               dist: str = "laplace") -> tuple[Tensor, Tensor]:
    """Analytic clipping: alpha = k(bits) * b with b = mean|x - mean| (Laplace) or sigma (Gauss).

    Non-negative rows (ReLU outputs) are one-sided: they use the row one bit higher.
    """
    lo0, hi0 = x.amin(1), x.amax(1)
    one_sided = bool((lo0 >= 0).all())
    # symmetric codes clip around 0, so their spread is measured around 0 too
    centre = torch.zeros_like(lo0) if (signed and symmetric and not one_sided) else x.mean(1)
    dev = x - centre.unsqueeze(1)
    spread = dev.abs().mean(1) if dist == "laplace" else dev.pow(2).mean(1).sqrt()
    alpha = aciq_alpha(bits + 1 if one_sided else bits, dist) * spread
    if one_sided:
        return lo0, torch.minimum(hi0, torch.maximum(alpha, hi0 * 1e-3))
    return torch.maximum(lo0, centre - alpha), torch.minimum(hi0, centre + alpha)


RangeFn = Callable[..., tuple[Tensor, Tensor]]
RANGE_ESTIMATORS: dict[str, RangeFn] = {"minmax": minmax_range, "mse": lp_search_range, "aciq": aciq_range}


def lloyd_range(x: Tensor, bits: int, signed: bool, symmetric: bool, narrow: bool = False,
                iters: int = 30, **_) -> tuple[Tensor, Tensor]:
    """Alternating (Lloyd-style) scale fit: codes = clip(round(x / s)), s = <x, q> / <q, q>.

    This is Bit-Split's activation / weight-init fit. Rows that go negative under an
    asymmetric quantizer have no single-scale Lloyd fit, so they fall back to the MSE search.
    """
    lo0, hi0 = x.amin(1), x.amax(1)
    one_sided = bool((lo0 >= 0).all())
    if not one_sided and not (signed and symmetric):
        return lp_search_range(x, bits, signed, symmetric, narrow, p=2.0)
    qmin, qmax = (0, 2 ** bits - 1) if one_sided else int_range(bits, True, narrow)
    top = torch.maximum(hi0, -lo0) if not one_sided else hi0
    scale = (top / max(qmax, 1)).clamp_min(1e-8)
    for _ in range(iters):
        q = torch.clamp(torch.round(x / scale.unsqueeze(1)), qmin, qmax)
        new = (x * q).sum(1) / (q * q).sum(1).clamp_min(1e-12)
        new = torch.where(new > 0, new, scale)
        if torch.allclose(new, scale, rtol=1e-7, atol=0):
            scale = new
            break
        scale = new
    hi = scale * qmax
    return (torch.zeros_like(hi) if one_sided else -hi), hi


RANGE_ESTIMATORS["lloyd"] = lloyd_range
