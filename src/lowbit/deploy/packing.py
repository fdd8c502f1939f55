"""Dense bit packing of integer codes: any width 1..16, little-endian bit order within bytes."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import LowbitError


def pack_codes(q: Tensor, bits: int, qmin: int) -> Tensor:
    """Pack integer codes in ``[qmin, qmin + 2^bits - 1]`` into a uint8 tensor, ``bits`` per value.

    Codes are offset by ``-qmin`` so they are non-negative; 4-bit codes pack two per byte,
    2-bit four per byte, 3-bit eight values in three bytes.
    """
    u = (q.reshape(-1).to(torch.int64) - qmin).cpu().numpy()
    if u.size and (u.min() < 0 or u.max() >= 2 ** bits):
        raise LowbitError(f"codes outside the {bits}-bit range starting at {qmin}")
    bit_matrix = ((u[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack_codes(packed: Tensor, bits: int, qmin: int, count: int) -> Tensor:
    """Inverse of ``pack_codes``: ``count`` int32 codes."""
    flat = np.unpackbits(packed.cpu().numpy().astype(np.uint8), bitorder="little")
    if flat.size < count * bits:
        raise LowbitError("packed weight buffer is too short for its shape and bit width")
    bit_matrix = flat[: count * bits].reshape(count, bits).astype(np.int64)
    u = (bit_matrix << np.arange(bits)).sum(1)
    return torch.from_numpy(u + qmin).to(torch.int32)


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8
