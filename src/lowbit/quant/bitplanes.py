"""Ternary bit planes: q = sum_m 2^(m-1) t_m with t_m in {-1, 0, +1} (Bit-Split's weight form).

``b``-bit narrow-range integers in [-(2^(b-1)-1), 2^(b-1)-1] split into ``b - 1`` planes by
sign-magnitude: t_m = sign(q) * bit_(m-1)(|q|). Two-bit weights have one plane, i.e. ternary
weights {-1, 0, +1} times the scale.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LowbitError


def num_planes(bits: int) -> int:
    if bits < 2:
        raise LowbitError(f"ternary bit planes need at least 2 bits, got {bits}")
    return bits - 1


def split_planes(q: Tensor, bits: int) -> Tensor:
    """``M x q.shape`` planes in {-1, 0, 1} (M = bits - 1), least significant first."""
    m = num_planes(bits)
    qmax = 2 ** m - 1
    qi = q.round().to(torch.int64)
    if qi.numel() and int(qi.abs().max()) > qmax:
        raise LowbitError(f"integers exceed the {bits}-bit narrow range [-{qmax}, {qmax}]")
    mag, sign = qi.abs(), torch.sign(qi)
    return torch.stack([((mag >> i) & 1) * sign for i in range(m)]).to(q.dtype)


def stitch_planes(planes: Tensor) -> Tensor:
    """Integers ``sum_m 2^(m-1) t_m`` from planes (inverse of ``split_planes``)."""
    weights = (2 ** torch.arange(planes.shape[0], device=planes.device)).to(planes.dtype)
    return torch.tensordot(weights, planes, dims=1)
