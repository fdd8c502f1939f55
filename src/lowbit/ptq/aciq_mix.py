"""ACIQ-Mix (Banner, Nahshan, Soudry, "Post-training 4-bit quantization of convolutional networks
for rapid-deployment", NeurIPS 2019): ACIQ analytic clipping, per-channel bit allocation under a
fixed average width, and bias correction of the weights.

Per-channel bit allocation. Banner et al. minimise the summed rounding noise ``sum_i a_i^2 /
(3 * 4^M_i)`` of channels clipped at ``a_i`` with ``M_i`` bits under a quota on the total
quantization intervals and find ``2^M_i`` proportional to ``a_i^(2/3)``. Here the quota is the
average width (the layer's budget ``b``, so the weight memory is exactly that of a ``b``-bit layer):
the real-valued allocation with that law is ``M_i = b + (2/3) (log2 a_i - mean_j log2 a_j)``, and
the integer one (``allocate_bits``) is the exact minimiser, within ``[min_bits, max_bits]``, of the
separable convex objective ``sum_i a_i^(4/3) 4^-M_i`` whose continuous optimum that is, found
greedily: every extra bit goes where it lowers the objective most. The widths sum to exactly
``b`` times the channel count, so their mean is the budget, never above it, and a channel with a
larger range never gets fewer bits. ``a_i`` is each channel's ACIQ clip at the budget width
(``alloc_range="clip"``, as Banner et al.) or its max |w| (``"minmax"``).

Each channel is then clipped by ACIQ for its own width (``quant.ranges.aciq_range``, Laplace or
Gaussian prior) and its scale set from that clip.

Bias correction. Banner et al. correct each output channel's quantized weights for the shift of
their mean and the change of their spread: ``W_c <- xi_c (W^q_c + mu_c)``, ``mu_c = E[W_c] -
E[W^q_c]``, ``xi_c = ||W_c - E W_c|| / ||W^q_c - E W^q_c||``. ``xi_c`` multiplies the channel's
scale (the integer codes stay; the layer's weight becomes the corrected grid values, as Bit-Split
leaves its weights). An additive ``mu_c`` on the weights has no integer form, so its
purpose, the mean of each output channel, is met through the layer's bias instead: the bias is
shifted by the mean output error ``E_x[(W^q - W) x]_c`` over the calibration images (the layer's FP
inputs; exact by linearity from their mean), which removes the mean shift of ``mu_c`` and any
other. Layers without a bias get one.

Storage. The ONNX graph holds one code width per layer: a layer is stored at the widest of its
channel widths, with each channel's codes inside its own narrower range (the simulation clamps per
channel, ``WeightQuantizer.group_bits``), so the stored values are exactly the mixed-precision
ones; the artifact (version 5) packs each channel's codes at its own width and records every
channel's width, and ``lowbit.summary`` reports the true average and those bytes. Activations stay per-tensor at ``a_bits`` with ACIQ clipping (Banner et
al. also allocate activation bits per channel; lowbit's activation quantizers, its integer path and
ONNX QDQ have one activation scale per tensor, so that part is not done).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..options import Range
from ..quant.layers import quant_layers
from ..quant.quantizer import WeightQuantizer
from ..quant.ranges import aciq_range
from ..quant.uniform import qparams_from_range
from .common import calibrate_inputs, observe_fp_inputs, quantizers_disabled, run_batches
from .registry import register_method

ALLOC_EXPONENT = 2.0 / 3.0  # 2^M_i proportional to a_i^(2/3) (Banner et al., eq. for per-channel bits)


@dataclass(frozen=True)
class AciqMixOptions:
    """Options of ``method="aciq-mix"``.

    Attributes:
        dist: prior of the ACIQ clip, "laplace" (b = mean |x - mean|) or "gauss" (sigma).
        min_bits: fewest bits a channel gets (2: one bit would be a sign code with no zero).
        max_bits: most bits a channel gets (its layer is stored at its widest channel's width).
        alloc_range: the range ``a_i`` bits follow: "clip" (the channel's ACIQ clip at the layer's
            budget, as Banner et al.) or "minmax" (its max |w|).
        bias_correction: shift each output channel's bias by its mean output error on the
            calibration images (Banner et al.'s weight mean correction, in integer-exact form).
        var_correction: scale each channel's quantized weights to the FP weights' spread.
    """

    dist: Literal["laplace", "gauss"] = "laplace"
    min_bits: Annotated[int, Range(ge=2, le=16)] = 2
    max_bits: Annotated[int, Range(ge=2, le=16)] = 8
    alloc_range: Literal["clip", "minmax"] = "clip"
    bias_correction: bool = True
    var_correction: bool = True

    def __post_init__(self) -> None:
        if self.dist not in ("laplace", "gauss"):
            raise LowbitError(f"aciq-mix dist must be 'laplace' or 'gauss', got {self.dist!r}")
        if self.min_bits > self.max_bits:
            raise LowbitError(f"aciq-mix options: min_bits ({self.min_bits}) must not exceed "
                              f"max_bits ({self.max_bits})")


def allocate_bits(ranges: Tensor, budget: int, min_bits: int = 2, max_bits: int = 8) -> Tensor:
    """Integer widths per channel, averaging exactly ``budget``, following ``2^M_i ~ range_i^(2/3)``.

    The exact integer minimiser of ``sum_i r_i^(4/3) 4^-M_i`` subject to ``sum_i M_i = n * budget``
    and ``min_bits <= M_i <= max_bits``: starting from ``min_bits`` everywhere, the
    ``n * (budget - min_bits)`` extra bits go to the largest marginal gains. The gain of a
    channel's ``m``-th bit is decreasing in ``m``, so taking the top gains over all (channel, m)
    pairs is the greedy solution, and greedy is optimal for a separable convex objective. In log2
    units the gain of raising channel ``i`` from ``m`` bits is ``(2/3) log2 r_i - m`` (up to a
    constant). Ties (equal ranges) go to the lower channel index; zero ranges get ``min_bits``
    unless bits are left over.

    Args:
        ranges: ``n`` non-negative channel ranges (clip values).
        budget: average width; must lie in ``[min_bits, max_bits]``.

    Returns:
        ``n`` int64 widths with ``sum == n * budget``.
    """
    if not min_bits <= budget <= max_bits:
        raise LowbitError(f"aciq-mix: budget {budget} bits is outside [min_bits, max_bits] = [{min_bits}, {max_bits}]")
    r = ranges.detach().double().flatten().cpu()
    n = r.numel()
    extra = n * (budget - min_bits)
    bits = torch.full((n,), min_bits, dtype=torch.int64)
    if extra == 0:
        return bits
    levels = torch.arange(min_bits, max_bits, dtype=torch.float64)            # m: the bit being added is m + 1
    log_r = torch.where(r > 0, r.clamp_min(1e-300).log2(), torch.full_like(r, -1e300))
    gain = ALLOC_EXPONENT * log_r.unsqueeze(1) - levels.unsqueeze(0)          # n x (max - min)
    # stable order: ties to the lower channel index, and within a channel to the lower level
    order = torch.sort(gain.flatten(), descending=True, stable=True).indices[:extra]
    bits += torch.bincount(order // levels.numel(), minlength=n)
    return bits


def clip_rows(rows: Tensor, bits: Tensor, signed: bool, symmetric: bool, narrow: bool,
              dist: str) -> tuple[Tensor, Tensor]:
    """ACIQ clipping bounds of every row for its own width (rows grouped by width)."""
    lo, hi = torch.empty(len(rows), device=rows.device), torch.empty(len(rows), device=rows.device)
    for b in torch.unique(bits).tolist():
        idx = (bits == b).nonzero().flatten().to(rows.device)
        lo[idx], hi[idx] = aciq_range(rows[idx], bits=int(b), signed=signed, symmetric=symmetric, narrow=narrow,
                                      dist=dist)
    return lo, hi


@torch.no_grad()
def calibrate_mixed_weights(wq: WeightQuantizer, weight: Tensor, opts: AciqMixOptions) -> None:
    """Allocate widths over ``wq``'s scale groups, then clip each group by ACIQ for its width."""
    rows = wq.grouped(weight.detach().float())
    budget = wq.bits
    if wq.binary:  # a 1-bit layer is a sign code: no widths to mix
        wq.calibrate(weight, aciq_range, dist=opts.dist)
        return
    lo_b, hi_b = min(opts.min_bits, budget), max(opts.max_bits, budget)
    if opts.alloc_range == "clip":
        lo, hi = aciq_range(rows, bits=budget, signed=wq.signed, symmetric=wq.symmetric, narrow=wq.narrow,
                            dist=opts.dist)
        ranges = torch.maximum(-lo, hi) if wq.symmetric else hi - lo
    else:
        ranges = rows.abs().amax(1) if wq.symmetric else rows.amax(1) - rows.amin(1)
    bits = allocate_bits(ranges, budget, lo_b, hi_b)
    lo, hi = clip_rows(rows, bits.to(rows.device), wq.signed, wq.symmetric, wq.narrow, opts.dist)
    scale, zero = [], []
    for g, b in enumerate(bits.tolist()):
        s, z = qparams_from_range(lo[g:g + 1], hi[g:g + 1], b, wq.signed, wq.symmetric, wq.narrow)
        scale.append(s)
        zero.append(z)
    wq.set_group_bits(bits.tolist())
    wq.scale.copy_(torch.cat(scale))
    wq.zero_point.copy_(torch.cat(zero))


@torch.no_grad()
def correct_variance(wq: WeightQuantizer, weight: Tensor) -> None:
    """Scale each group's quantized weights to the FP spread (``xi_c`` of Banner et al.), in place.

    The codes stay; ``xi_c`` multiplies the group's scale, and ``weight`` becomes the corrected
    values themselves (on the new grid), so that quantizing it again gives back exactly these
    codes (re-quantizing the FP weight with the larger or smaller scale would round differently).
    """
    w = weight.detach()
    rows = wq.grouped(w.float())
    codes = wq.quantize(w).int_value.to(w.dtype)
    q_rows = wq.grouped(wq.dequantize(codes).float())
    fp = (rows - rows.mean(1, keepdim=True)).norm(dim=1)
    qn = (q_rows - q_rows.mean(1, keepdim=True)).norm(dim=1)
    xi = torch.where(qn > 0, fp / qn.clamp_min(1e-30), torch.ones_like(fp))
    wq.scale.mul_(xi.to(wq.scale.dtype))
    weight.copy_(wq.dequantize(codes).to(weight.dtype))


@torch.no_grad()
def mean_inputs(model: nn.Module, calib: Tensor, cfg: QuantConfig, names: list[str]) -> dict[str, Tensor]:
    """Mean over the calibration images of each named layer's FP input (one image's shape).

    Layers called with more than one argument, or with inputs whose shape changes between
    calls, are left out (their output mean is not a function of one input mean).
    """
    layers = dict(quant_layers(model))
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    unusable: set[str] = set()

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0] if len(args) == 1 else None
            if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
                unusable.add(name)
                return
            s = x.detach().double().sum(0)  # float64: 1024 images of small means without drift
            if name in sums and sums[name].shape != s.shape:
                unusable.add(name)
                return
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [layers[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with quantizers_disabled(model):
            run_batches(model, calib, cfg, desc="aciq-mix: mean inputs")
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums if n not in unusable}


@torch.no_grad()
def correct_bias(layer: nn.Module, x_mean: Tensor, fp_weight: Tensor) -> None:
    """Shift the bias by minus the mean output error of the quantized weights on inputs of mean ``x_mean``.

    By linearity the mean over images and output positions of ``layer(x)`` with quantized
    weights minus ``layer(x)`` with the FP weights ``fp_weight`` is that difference on the mean
    input, averaged over positions (zero padding included); the input quantizer is off for both,
    so only the weights' error is corrected.
    """
    wq, aq = layer.weight_quant, layer.input_quant
    x = x_mean.unsqueeze(0).to(layer.weight.device, layer.weight.dtype)
    saved = (wq.enabled, aq.enabled)
    kept = layer.weight.data
    try:
        aq.enabled = False
        wq.enabled = True
        y_q = layer(x)
        wq.enabled = False
        layer.weight.data = fp_weight  # variance correction may have moved the weight onto its grid
        y_fp = layer(x)
    finally:
        layer.weight.data = kept
        wq.enabled, aq.enabled = saved
    channel_dim = y_q.dim() - 1 if layer.kind == "linear" else 1
    err = (y_q - y_fp).double().movedim(channel_dim, 0).reshape(y_q.shape[channel_dim], -1).mean(1)
    shift = (-err).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(shift)
    else:
        layer.bias.add_(shift)


@register_method("aciq-mix", AciqMixOptions,
                 description="ACIQ-Mix: per-channel widths under the average width, ACIQ clips, bias correction")
def aciq_mix(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: AciqMixOptions) -> None:
    """Allocate and clip every weight layer's channel widths, correct their bias, clip activations by ACIQ.

    Every statistic of the FP network (activation samples, mean layer inputs) is taken before
    any weight changes, so all of them are the FP network's.
    """
    weighted = [(n, l) for n, l in quant_layers(qmodel) if l.weight_quant.enabled]
    given = [n for n, l in weighted if l.weight_quant.group_bits is not None]
    if given:  # its own allocation would overwrite them
        raise LowbitError(f"aciq-mix allocates every layer's per-channel widths itself: it cannot honour the "
                          f"per-channel widths layer_bits gives {given[0]!r}; give that layer one width (its "
                          f"budget), or use another method (minmax, mse, aciq, bitsplit, brecq, ...)")
    observers = observe_fp_inputs(qmodel, calib, cfg)
    means = mean_inputs(qmodel, calib, cfg, [n for n, _ in weighted]) if opts.bias_correction else {}
    fp_weights = {n: l.weight.detach().clone() for n, l in weighted if n in means}
    for _, layer in weighted:
        calibrate_mixed_weights(layer.weight_quant, layer.weight, opts)
        if opts.var_correction and not layer.weight_quant.binary:
            correct_variance(layer.weight_quant, layer.weight)
    calibrate_inputs(qmodel, observers, aciq_range, dist=opts.dist)
    for name, layer in weighted:
        if name in means:
            correct_bias(layer, means[name], fp_weights[name])
