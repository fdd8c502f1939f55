"""Bit-Split and Stitching PTQ (Wang et al., ICML 2020), vectorised and error-compensated.

For each layer (in execution order) the weights are written as ``alpha * sum_m 2^(m-1) t_m``
with ternary planes ``t_m`` and fitted to the FP layer output on calibration patches:
min ||Y - X W_q^T||^2, alternating a closed-form per-channel (or per-group) scale with exact
ternary coordinate descent on each plane, using only the Gram matrices A = X^T X and
B = Y^T X. The planes are stitched back into ordinary b-bit integers.

With error compensation (default) X is the *quantized* input produced by the already
quantized preceding layers, while Y stays the FP network's output of this layer, so each
layer also undoes the error that reaches it. Activation scales are fitted the same way:
on the input the quantized network actually produces.

Layer kinds: Conv2d; Conv1d as a conv2d over ``N x C x 1 x L``; ConvTranspose2d through its
equivalent direct convolution (zero-inserted input, flipped kernel; see ``ConvGeometry``), so
its fit is the same least-squares problem; Linear. Subclasses with their own forward are not
known to compute ``conv(x, W)``: their weights get the MSE clipping search instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..options import Range
from ..quant.bitplanes import num_planes, split_planes, stitch_planes
from ..quant.ranges import RANGE_ESTIMATORS, lp_search_range
from ..train.bn import reestimate_bn
# the patch and Gram machinery lives in layerwise (shared with TSQ); its names stay importable from here
from .layerwise import (ConvGeometry, conv_geometry, layer_statistics, output_positions,  # noqa: F401
                        patch_rows, rows_to_weight, sample_index, scale_group_of_rows, weight_rows)
from .sequential import walk_layers
from .registry import register_method


@dataclass(frozen=True)
class BitSplitOptions:
    """Options of ``method="bitsplit"``.

    Attributes:
        iters: outer rounds of (scale update, one sweep over every plane).
        samples: patch rows drawn from the calibration set per layer (0 = every position).
        error_compensation: fit each layer (weights and input scale) on the input produced by
            the already-quantized preceding layers; False fits on FP inputs like the official code.
        act_method: input-scale fit: "mse" (search over clip ratios, default: measured better
            than the alternating fit, which stops at local optima), "lloyd" (Bit-Split's
            alternating fit) or "minmax".
        bias_correction: shift each bias so the mean output matches the FP layer's.
        bn_reestimate: re-estimate the statistics of BatchNorm layers that were not folded on
            the calibration set (needs fold_bn=False; the official code does this on 12.8k images).
        fit_dtype: "float64" (default, exact and stable) or "float32" for the coordinate descent.
    """

    iters: Annotated[int, Range(ge=1)] = 4
    samples: Annotated[int, Range(ge=0)] = 32768
    error_compensation: bool = True
    act_method: Literal["lloyd", "mse", "minmax"] = "mse"
    bias_correction: bool = True
    bn_reestimate: bool = False
    fit_dtype: Literal["float64", "float32"] = "float64"

    def __post_init__(self) -> None:
        if self.act_method not in ("lloyd", "mse", "minmax"):
            raise LowbitError(f"bitsplit act_method must be lloyd, mse or minmax, got {self.act_method!r}")
        if self.iters < 1 or self.samples < 0:
            raise LowbitError("bitsplit needs iters >= 1 and samples >= 0")
        if self.fit_dtype not in ("float64", "float32"):
            raise LowbitError("bitsplit fit_dtype must be 'float64' or 'float32'")


# ---------------------------------------------------------------------------------------------
# The optimisation, on Gram matrices (pure functions)
# ---------------------------------------------------------------------------------------------

def lloyd_weight_scale(w: Tensor, qmax: int, iters: int = 30) -> Tensor:
    """Per-row scale from alternating q = clip(round(w / a)), a = <w, q> / <q, q> (Bit-Split init)."""
    a = (w.abs().amax(-1) / qmax).clamp_min(1e-12)
    for _ in range(iters):
        q = torch.clamp(torch.round(w / a.unsqueeze(-1)), -qmax, qmax)
        new = (w * q).sum(-1) / (q * q).sum(-1).clamp_min(1e-30)
        new = torch.where(new > 0, new, a)
        if torch.allclose(new, a, rtol=1e-10, atol=0):
            return new
        a = new
    return a


def _scale_groups(alpha_num: Tensor, alpha_den: Tensor, group_of: Tensor, n_groups: int) -> Tensor:
    """Closed-form scale per scale group: sum q^T b / sum q^T A q over the group's channels."""
    num = torch.zeros(n_groups, dtype=alpha_num.dtype, device=alpha_num.device).index_add_(0, group_of, alpha_num)
    den = torch.zeros(n_groups, dtype=alpha_den.dtype, device=alpha_den.device).index_add_(0, group_of, alpha_den)
    return num / den.clamp_min(1e-30)


def bitsplit_fit(A: Tensor, B: Tensor, w: Tensor, bits: int, group_of: Tensor, n_groups: int,
                 iters: int = 4, binary: bool = False) -> tuple[Tensor, Tensor]:
    """Fit integer weights and scales to min_{a, t} a^2 q^T A q - 2 a q^T b for every channel.

    Args:
        A: ``K x D x D`` Gram matrix X^T X of each conv group (K conv groups).
        B: ``K x C x D`` rows b_c = X^T y_c for the C output channels of each conv group.
        w: ``K x C x D`` FP weights (initialisation).
        bits: weight bit width (b - 1 ternary planes; 1 bit = binary codes {-1, +1}).
        group_of: scale-group index of each of the K*C channels (flattened K-major).
        n_groups: number of scale groups.
        iters: outer rounds.
        binary: 1-bit codes in {-1, +1} (coordinate updates pick the sign).

    Returns:
        ``(q, alpha)``: integers ``K x C x D`` and per-scale-group scales.
    """
    K, C, D = w.shape
    flat = lambda t: t.reshape(K * C)  # noqa: E731
    if binary:
        planes_n, qmax = 1, 1
    else:
        planes_n, qmax = num_planes(bits), 2 ** (bits - 1) - 1
    # initial scale (per scale group) and integers by the alternating weight fit
    rows = w.reshape(K * C, D)
    order = torch.argsort(group_of, stable=True)
    grouped = rows[order].reshape(n_groups, -1)
    if binary:
        alpha_g = grouped.abs().mean(1).clamp_min(1e-12)
    else:
        alpha_g = lloyd_weight_scale(grouped, qmax)
    alpha = alpha_g[group_of].reshape(K, C)
    if binary:
        planes = torch.where(w >= 0, 1.0, -1.0).to(w.dtype).unsqueeze(0)
    else:
        planes = split_planes(torch.clamp(torch.round(w / alpha.unsqueeze(-1)), -qmax, qmax), bits)
    diag = torch.diagonal(A, dim1=1, dim2=2)  # K x D
    for _ in range(iters):
        q = stitch_planes(planes)
        Aq = torch.bmm(q, A)  # K x C x D (A symmetric)
        alpha_g = _scale_groups(flat((q * B).sum(-1)), flat((q * Aq).sum(-1)), group_of, n_groups)
        alpha_g = torch.where(alpha_g > 0, alpha_g, torch.full_like(alpha_g, 1e-12))
        alpha = alpha_g[group_of].reshape(K, C)
        b_scaled = B / alpha.unsqueeze(-1)
        for m in reversed(range(planes_n)):  # most significant plane first
            sweep_plane(planes[m], float(2 ** m), A, diag, Aq, b_scaled, binary)
    q = stitch_planes(planes)
    num, den = (q * B).sum(-1), (q * torch.bmm(q, A)).sum(-1)
    alpha_g = _scale_groups(flat(num), flat(den), group_of, n_groups)
    alpha_g = torch.where(alpha_g > 0, alpha_g, torch.full_like(alpha_g, 1e-12))
    return q, alpha_g


def sweep_plane(t: Tensor, c: float, A: Tensor, diag: Tensor, Aq: Tensor, b_scaled: Tensor, binary: bool) -> None:
    """One Gauss-Seidel sweep over the coordinates of plane ``t`` (``K x C x D``), in place.

    With everything else fixed, the objective in coordinate n is quadratic in t_n with
    minimiser t* = (b_n / a - u_n) / (c A_nn), u_n = (A q)_n without this coordinate; the
    exact ternary minimiser is t* rounded to {-1, 0, 1} (ties to 0), the binary one its sign.
    ``Aq`` (= q A) is kept up to date. All output channels and conv groups move together.
    """
    inv = torch.where(diag > 0, 1.0 / (c * diag).clamp_min(1e-300), torch.zeros_like(diag)).unsqueeze(-1)  # K x D x 1
    A_rows = A.unsqueeze(1)  # K x 1 x D x D
    for n in range(t.shape[-1]):
        t_old = t[:, :, n]
        target = (b_scaled[:, :, n] - Aq[:, :, n]) * inv[:, n] + t_old
        if binary:
            t_new = torch.where(target >= 0, 1.0, -1.0).to(t.dtype)
        else:
            t_new = target.clamp(-1.0, 1.0).round()
        delta = (t_new - t_old).mul_(c)
        Aq.addcmul_(delta.unsqueeze(-1), A_rows[:, :, n, :])
        t[:, :, n] = t_new


def _fit_widths(A: Tensor, B: Tensor, W: Tensor, group_bits: tuple[int, ...], group_of: Tensor, n_groups: int,
                iters: int) -> tuple[Tensor, Tensor]:
    """``bitsplit_fit`` for per-channel widths (per-channel scales: every channel's fit is its own
    least-squares problem): one fit per width present, each channel taking its own width's result
    (1 bit: binary codes; 0: pruned, codes 0 with the widest fit's scale)."""
    widths = torch.tensor(group_bits, device=group_of.device)[group_of].reshape(W.shape[:2])  # K x C
    q = torch.zeros_like(W)
    alpha_g = torch.empty(n_groups, dtype=W.dtype, device=W.device)
    per_group = torch.tensor(group_bits, device=W.device)
    for b in sorted(set(group_bits) - {0}, reverse=True):
        qb, ab = bitsplit_fit(A, B, W, b, group_of, n_groups, iters, binary=b == 1)
        rows = widths == b
        q[rows] = qb[rows]
        alpha_g[per_group == b] = ab[per_group == b]
        if b == max(group_bits):
            alpha_g[per_group == 0] = ab[per_group == 0]
    return q, alpha_g


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def quantize_layer_weights(layer: nn.Module, stats: dict[str, Tensor], opts: BitSplitOptions) -> None:
    """Fit, stitch and install the integer weights and scales of one layer (+ bias correction)."""
    wq = layer.weight_quant
    if not wq.symmetric:
        raise LowbitError("bitsplit produces symmetric (zero-point free) weights: use w_symmetric=True")
    dtype = stats["A"].dtype
    K = stats["A"].shape[0]
    W = weight_rows(layer, layer.weight.detach().to(dtype))
    B = torch.bmm(W, stats["cross"])  # rows X_q^T y_c with y_c = X_fp w_c
    group_of = scale_group_of_rows(layer)
    if wq.group_bits is None:
        q, alpha_g = bitsplit_fit(stats["A"], B, W, wq.bits, group_of, wq.num_groups, opts.iters, wq.binary)
    else:
        q, alpha_g = _fit_widths(stats["A"], B, W, wq.group_bits, group_of, wq.num_groups, opts.iters)
    alpha = alpha_g[group_of].reshape(K, -1, 1)
    new_rows = q * alpha
    new_w = rows_to_weight(layer, new_rows)
    if opts.bias_correction:
        target = torch.bmm(W, stats["mean_fp"].unsqueeze(-1)).reshape(-1)
        got = torch.bmm(new_rows.to(dtype), stats["mean_q"].unsqueeze(-1)).reshape(-1)
        shift = (target - got).to(layer.weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(shift)
        else:
            layer.bias.add_(shift)
    wq.scale.copy_(alpha_g.to(wq.scale.dtype))
    wq.zero_point.zero_()
    layer.weight.copy_(new_w.to(layer.weight.dtype))


@register_method("bitsplit", BitSplitOptions,
                 description="Bit-Split and Stitching: ternary bit planes fitted to layer outputs, error-compensated")
def bitsplit(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: BitSplitOptions) -> None:
    if opts.bn_reestimate and cfg.fold_bn:
        raise LowbitError("bn_reestimate needs fold_bn=False (folded BatchNorm has no statistics left)")
    device = torch.device(cfg.device)
    dtype = torch.float64 if opts.fit_dtype == "float64" else torch.float32
    act_range = RANGE_ESTIMATORS[opts.act_method]
    visited = [0]

    def visit(name: str, layer: nn.Module, x_fp: Tensor, x_q: Tensor, enabled: tuple[bool, bool]) -> None:
        seed = cfg.seed + visited[0]
        visited[0] += 1
        x_in = x_q if opts.error_compensation else x_fp
        w_on, a_on = enabled
        if a_on:
            layer.input_quant.calibrate(x_in.reshape(-1)[sample_index(x_in.numel(), seed).to(x_in.device)], act_range)
            layer.input_quant.enabled = True
            x_in = layer.input_quant(x_in)
        if w_on and layer.custom_forward:
            # a subclass's own forward is not known to be conv(x, W): no least-squares fit on patches,
            # its weights get the MSE clipping search instead
            layer.weight_quant.calibrate(layer.weight, lp_search_range)
            layer.weight_quant.enabled = True
        elif w_on:
            stats = layer_statistics(layer, x_fp, x_in, opts.samples, seed, device, dtype)
            quantize_layer_weights(layer, stats, opts)
            layer.weight_quant.enabled = True

    walk_layers(qmodel, calib, cfg, visit, desc="bit-split")
    if opts.bn_reestimate:
        reestimate_bn(qmodel, calib.clone(), cfg.batch_size, device)  # a model may change its input in place
