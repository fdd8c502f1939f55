"""Uniform affine quantization as pure functions (no state).

Integers ``q`` live in ``[qmin, qmax]``; real values are ``(q - zero_point) * scale``. One-bit
signed values are the binary pair ``{-1, +1}`` (sign quantization), which has no zero level.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LowbitError


@dataclass(frozen=True)
class QuantResult:
    """Everything a quantizer produced for one tensor (Brevitas style)."""

    value: Tensor        # dequantized (simulated) values, same shape as the input
    int_value: Tensor    # integers in [qmin, qmax]
    scale: Tensor
    zero_point: Tensor
    bits: int


def check_bits(bits: int, what: str = "bits") -> int:
    """Validate a bit width (1..16) and return it as int."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise LowbitError(f"{what} must be an integer from 1 to 16, got {bits!r}")
    return bits


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a ``bits``-wide code.

    Signed narrow range is symmetric (4 bit -> [-7, 7]); signed 1 bit is binary (-1, +1).
    """
    check_bits(bits)
    if not signed:
        return 0, 2 ** bits - 1
    if bits == 1:
        return -1, 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def is_binary(bits: int, signed: bool) -> bool:
    return signed and bits == 1


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through (identity) gradient."""
    return (x.round() - x).detach() + x


def sign_ste(x: Tensor) -> Tensor:
    """Sign in {-1, +1} (0 maps to +1) with a straight-through gradient."""
    return (torch.where(x >= 0, 1.0, -1.0).to(x.dtype) - x).detach() + x


def quantize_affine(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int | Tensor, qmax: int | Tensor) -> Tensor:
    """Integer codes (as floats) ``clamp(round(x / scale) + zero_point, qmin, qmax)``."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize_affine(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Real values ``(q - zero_point) * scale``."""
    return (q - zero_point) * scale


def binary_fake_quantize(x: Tensor, scale: Tensor) -> Tensor:
    """Binary codes ``{-1, +1}`` (0 maps to +1) times ``scale``, straight-through when ``x`` needs a gradient."""
    return (sign_ste(x) if x.requires_grad else torch.where(x >= 0, 1.0, -1.0).to(x.dtype)) * scale


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int | Tensor, qmax: int | Tensor,
                  binary: bool = False) -> Tensor:
    """Quantize-dequantize with straight-through gradients for ``x`` and LSQ-style ones for scale.

    ``qmin`` / ``qmax`` are ints, or tensors broadcast like ``scale`` (per-channel widths).

    Inside the clipping range the gradient w.r.t. ``x`` is 1, outside it is 0.
    """
    if binary:
        return binary_fake_quantize(x, scale)
    if not (x.requires_grad or scale.requires_grad):  # inference: same arithmetic, in place, fewer passes
        q = torch.div(x, scale).round_().add_(zero_point).clamp_(qmin, qmax)
        return q.sub_(zero_point).mul_(scale)
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def to_int(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int | Tensor, qmax: int | Tensor,
           binary: bool = False) -> Tensor:
    """Integer codes of ``x`` as int32."""
    if binary:
        return torch.where(x >= 0, 1, -1).to(torch.int32)
    return quantize_affine(x, scale, zero_point, qmin, qmax).to(torch.int32)


def qparams_from_range(lo: Tensor, hi: Tensor, bits: int, signed: bool, symmetric: bool,
                       narrow: bool = False, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Scale and zero point that cover ``[lo, hi]`` (elementwise over groups).

    Symmetric codes use ``max(|lo|, |hi|) / qmax`` and zero point 0; asymmetric (unsigned
    codes with a zero point) spread ``[min(lo, 0), max(hi, 0)]`` over ``2^bits - 1`` steps.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if signed and symmetric:
        _, qmax = int_range(bits, True, narrow)
        scale = torch.maximum(-lo, hi) / max(qmax, 1)
        return scale.clamp_min(eps), torch.zeros_like(scale)
    qmin, qmax = int_range(bits, False)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    zero_point = torch.clamp(torch.round(-lo / scale), qmin, qmax)
    return scale, zero_point
