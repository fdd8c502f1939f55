"""Clipping-range estimators: min/max, Lp-error search, ACIQ. Pure functions over rows.

Each takes ``x`` of shape ``G x n`` (one row per scale group) and returns ``(lo, hi)`` of
shape ``G``; ``qparams_from_range`` turns them into scale and zero point.
"""
from __future__ import annotations

import math
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
    qmin, qmax = int_range(bits, True, narrow) if signed and symmetric else int_range(bits, False)
    ratios = [1.0 - shrink * i for i in range(candidates)]
    ratios = ratios[:next((i for i, r in enumerate(ratios) if r <= 0), len(ratios))]
    # every candidate's range and grid at once (elementwise, so each row equals lo0 * ratio of a loop)
    ratio = torch.tensor(ratios, dtype=lo0.dtype, device=lo0.device).unsqueeze(1)
    los, his = lo0 * ratio, hi0 * ratio
    scales, zps = qparams_from_range(los, his, bits, signed, symmetric, narrow)
    # one work buffer, updated in place: the same operations in the same order as
    # (clamp(round(x / s) + z) - z) * s - x, so the same errors bit for bit, without ten temporaries
    # of x's size per candidate (2x faster at p = 2, 1.35x at p = 2.4 where pow dominates)
    q = torch.empty_like(x)
    errs = torch.empty_like(scales)
    for i in range(len(ratios)):
        s, z = scales[i].unsqueeze(1), zps[i].unsqueeze(1)
        torch.div(x, s, out=q)
        q.round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).sub_(x).abs_()
        torch.mean(q.square_() if p == 2 else q.pow_(p), 1, out=errs[i])
    # the first candidate with the least error per row (NaN errors never win, as with a strict <)
    best = torch.nan_to_num(errs, nan=float("inf")).argmin(0, keepdim=True)
    return los.gather(0, best).squeeze(0), his.gather(0, best).squeeze(0)


def lp_grid_search_range(x: Tensor, bits: int, signed: bool, symmetric: bool, narrow: bool = False,
                         p: float = 2.0, candidates: int = 100, **_) -> tuple[Tensor, Tensor]:
    """Search clip width and integer zero point jointly, per row, for least Lp error (QDrop's observer).

    Asymmetric codes place ``2^bits`` levels ``scale`` apart; widths ``i / candidates`` of the row's
    span (which always holds 0) are tried with every integer zero point, so a 2-bit row can put
    its four levels anywhere, not only on a range shrunk around its min and max. Signed symmetric
    codes have no zero point to search: they take ``lp_search_range``.
    """
    if signed and symmetric:
        return lp_search_range(x, bits, signed, symmetric, narrow, p=p, candidates=candidates)
    qmin, qmax = int_range(bits, False)
    lo0 = x.amin(1).clamp_max(0.0)
    hi0 = x.amax(1).clamp_min(0.0)
    span = (hi0 - lo0).clamp_min(1e-8)
    # every (width, zero point) pair, evaluated in chunks of pairs: one tensor op per chunk rather
    # than per pair keeps small layers (and the 256 zero points of 8-bit ones) cheap, and the
    # chunk size bounds memory for large ones
    widths = torch.arange(1, candidates + 1, dtype=x.dtype, device=x.device) / candidates
    zps = torch.arange(qmin, qmax + 1, dtype=x.dtype, device=x.device)
    pair_w = widths.repeat_interleave(len(zps))  # K pairs
    pair_z = zps.repeat(len(widths))
    per_chunk = max(1, (1 << 22) // max(1, x.numel()))
    best_err = torch.full_like(lo0, float("inf"))
    best_scale = (span / (qmax - qmin)).clamp_min(1e-8)
    best_zp = torch.zeros_like(lo0)
    for start in range(0, len(pair_w), per_chunk):
        w, z = pair_w[start:start + per_chunk], pair_z[start:start + per_chunk]
        scale = (span.unsqueeze(1) * w / (qmax - qmin)).clamp_min(1e-8)  # G x k
        s3, z3 = scale.unsqueeze(2), z.view(1, -1, 1)
        q = (torch.clamp(torch.round(x.unsqueeze(1) / s3) + z3, qmin, qmax) - z3) * s3  # G x k x n
        err, k = (q - x.unsqueeze(1)).abs().pow(p).mean(2).min(1)  # best pair of the chunk, per row
        better = err < best_err  # strict: the first (narrowest, lowest zero point) of equals wins
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale.gather(1, k.unsqueeze(1)).squeeze(1), best_scale)
        best_zp = torch.where(better, z[k], best_zp)
    # these bounds give back exactly this scale and zero point in qparams_from_range
    best_lo, best_hi = -best_zp * best_scale, (qmax - best_zp) * best_scale
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


# ---------------------------------------------------------------------------------------------
# TensorRT entropy calibration (Migacz 2017): the clip whose quantized histogram is closest in KL
# ---------------------------------------------------------------------------------------------

def kl_divergences(hist: Tensor, starts: Tensor, lengths: Tensor, levels: int, eps: float = 1e-4,
                   block: int = 256) -> Tensor:
    """KL(P || Q) of every candidate window of a histogram (TensorRT entropy calibration).

    Candidate ``k`` keeps bins ``[starts[k], starts[k] + lengths[k])``. Its reference P is that
    slice with the clipped mass folded into the outermost kept bins (left tail into the first,
    right tail into the last). Its quantized Q merges the slice (without the tails) into
    ``levels`` equal chunks (bin ``t`` goes to chunk ``floor(t * levels / length)``) and spreads
    each chunk's mass evenly over the chunk's bins where P is non-zero (0 elsewhere). Then, as
    MXNet / TVM do, each of P and Q is smoothed (every empty bin of the window gets ``eps``
    counts, taken evenly from its non-empty bins) and normalised.

    Q is constant on the non-empty bins of a chunk, so ``sum_t P_t log Q_t`` is summed per chunk;
    only ``sum_t P_t log P_t`` needs every bin.

    Args:
        hist: ``N`` bin counts.
        starts, lengths: ``K`` windows (integer tensors), every length at least ``levels``.
        levels: number of quantized values covering a window.
        eps: smoothing mass (in counts) of an empty bin.
        block: candidates evaluated at once (bounds memory to ``block x max(lengths)``).

    Returns:
        ``K`` divergences (``inf`` where Q has no mass).
    """
    hist = hist.double()
    dev = hist.device
    n_bins = hist.numel()
    cum = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
    tiny = eps * 1e-3  # a non-empty bin lighter than its share of eps stays a tiny positive mass
    out = []
    for b in range(0, len(starts), block):
        s = starts[b:b + block].to(dev).long()
        n = lengths[b:b + block].to(dev).long()
        k = len(s)
        t = torch.arange(int(n.max()), device=dev)
        support = t.unsqueeze(0) < n.unsqueeze(1)
        sliced = hist[(s.unsqueeze(1) + t).clamp(max=n_bins - 1)] * support
        rows = torch.arange(k, device=dev)
        p = sliced.clone()
        p[rows, 0] += cum[s]                              # left tail (values below the clip)
        p[rows, n - 1] += cum[-1] - cum[s + n]            # right tail (values above the clip)
        nz = p > 0
        n_nz = nz.sum(1)
        # smoothed P (unnormalised; smoothing keeps its total)
        take_p = (eps * (n - n_nz) / n_nz.clamp_min(1)).unsqueeze(1)
        ps = torch.where(nz, (p - take_p).clamp_min(tiny), eps * support)
        p_total = ps.sum(1)
        p_log_p = (ps * ps.clamp_min(1e-300).log()).sum(1)
        # Q per chunk: mass / non-empty bins. Chunk j holds the bins t with floor(t * levels / n) = j,
        # i.e. t in [ceil(j n / levels), ceil((j + 1) n / levels)): segment sums of row-wise cumsums.
        per_bin = torch.stack([sliced, nz.double(), ps * nz])
        cums = torch.cat([per_bin.new_zeros(3, k, 1), per_bin.cumsum(2)], 2)
        j = torch.arange(levels + 1, device=dev)
        edges = (j.unsqueeze(0) * n.unsqueeze(1) + levels - 1) // levels
        mass, bins_nz, p_in = cums.gather(2, edges.expand(3, k, levels + 1)).diff(dim=2)
        q_on = (mass > 0) & (bins_nz > 0)                 # chunks whose non-empty bins Q covers
        q_bins = (bins_nz * q_on).sum(1)                  # bins where Q > 0 before smoothing
        take_q = eps * (n - q_bins) / q_bins.clamp_min(1)
        qs = (mass / bins_nz.clamp_min(1) - take_q.unsqueeze(1)).clamp_min(tiny)
        q_total = (qs * bins_nz * q_on).sum(1) + eps * (n - q_bins)
        p_on = (p_in * q_on).sum(1)                       # P mass where Q is non-empty
        p_log_q = (p_in * q_on * qs.log()).sum(1) + (p_total - p_on) * math.log(eps)
        div = (p_log_p - p_log_q) / p_total - p_total.log() + q_total.log()
        out.append(torch.where(q_bins > 0, div, torch.full_like(div, float("inf"))))
    return torch.cat(out) if out else hist.new_zeros(0)


def _kl_row(v: Tensor, bits: int, signed: bool, symmetric: bool, narrow: bool, bins: int, eps: float,
            flatten_zero: bool) -> tuple[float, float]:
    lo0, hi0 = float(v.min()), float(v.max())
    top = max(-lo0, hi0)
    if top <= 0:
        return lo0, hi0
    qmin, qmax = int_range(bits, True, narrow) if signed and symmetric else int_range(bits, False)
    width = top / bins
    if lo0 >= 0 or hi0 <= 0:
        # one-sided (TensorRT): histogram of |x| over [0, max|x|], codes from 0 up cover it
        levels = qmax + 1
        a = v.abs()
        hist = torch.bincount((a / width).long().clamp(0, bins - 1), minlength=bins).double()
        if flatten_zero and bins > 1:
            hist[0] = hist[1]
        keep = torch.arange(min(levels, bins), bins + 1, device=v.device)
        starts = torch.zeros_like(keep)
        lengths = keep
    else:
        # two-sided: bins on each side of 0; a symmetric threshold i * width clips both tails.
        # Symmetric codes span [-T, T] whatever the data; codes with a zero point span only the
        # data inside it, so their window stops at the observed extremes.
        levels = qmax - qmin + 1
        hist = torch.bincount(((v + top) / width).long().clamp(0, 2 * bins - 1), minlength=2 * bins).double()
        if flatten_zero:
            hist[bins] = hist[bins + 1]  # the bin holding exact zeros, [0, width)
        i = torch.arange(1, bins + 1, device=v.device)
        left = bins - i
        right = bins + i
        if not (signed and symmetric):
            first = int((hist > 0).nonzero()[0])
            last = int((hist > 0).nonzero()[-1]) + 1
            left, right = left.clamp_min(first), right.clamp_max(last)
        ok = (right - left) >= levels
        if not bool(ok.any()):
            return lo0, hi0
        keep, starts, lengths = i[ok], left[ok], (right - left)[ok]
    div = kl_divergences(hist, starts, lengths, levels, eps)
    # the largest threshold among equal minima (pytorch-quantization does the same)
    best = int(len(div) - 1 - torch.argmin(div.flip(0)))
    thr = float(keep[best]) * width
    return max(lo0, -thr), min(hi0, thr)


def kl_range(x: Tensor, bits: int, signed: bool, symmetric: bool, narrow: bool = False, bins: int = 2048,
             eps: float = 1e-4, flatten_zero: bool = True) -> tuple[Tensor, Tensor]:
    """TensorRT entropy calibration: the clip minimising KL(reference || quantized histogram), per row.

    Non-negative (or non-positive) rows are histogrammed as |x| in ``bins`` bins over
    ``[0, max|x|]`` and the candidate thresholds are ``i * max|x| / bins`` for ``i`` from the
    number of codes on that side (``2^bits`` unsigned, ``2^(bits-1)`` signed, i.e. TensorRT's 128
    at int8) up to ``bins``; the threshold is the right edge of the last kept bin and ties go to
    the largest (NVIDIA's pytorch-quantization does both; it always starts at 128 bins, which
    would rule out every clip below 1/16 of the max at 4 bit). Rows with both signs are
    histogrammed two-sided (``bins`` per side, sign-aware, as MXNet / TVM do) and the candidates
    clip both tails at ``+-i * max|x| / bins``, quantized into all ``2^bits`` (narrow:
    ``2^bits - 1``) codes; for codes with a zero point the window also stops at the observed
    extremes, since those codes span only the clipped data. See ``kl_divergences`` for P and Q.

    ``flatten_zero`` replaces the count of the bin holding 0 by its neighbour's (NVIDIA's
    pytorch-quantization does this): half of a ReLU input is exactly 0. The quantizer keeps 0
    exactly (it is a code), but Q smears that spike evenly over the first chunk, so without the
    fix the spike dominates the divergence and drags every threshold down to the smallest chunks.
    """
    if bins < 2:
        raise LowbitError(f"kl_range needs bins >= 2, got {bins}")
    lo, hi = zip(*(_kl_row(row, bits, signed, symmetric, narrow, bins, eps, flatten_zero) for row in x))
    return (torch.tensor(lo, dtype=x.dtype, device=x.device), torch.tensor(hi, dtype=x.dtype, device=x.device))


RANGE_ESTIMATORS["kl"] = kl_range
