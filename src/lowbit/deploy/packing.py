"""Dense bit packing of integer codes: any width 1..16, little-endian bit order within bytes."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import LowbitError

# Up to 8 bits, eight codes fill exactly ``bits`` bytes, so they are packed as one little-endian
# 64-bit word per eight codes: a handful of whole-array shifts instead of a bit matrix of
# ``count x bits`` int64 values (about 20x less work on a large layer). Wider codes take the bit matrix.
_WORD_BITS = 8


def pack_codes(q: Tensor, bits: int, qmin: int) -> Tensor:
    """Pack integer codes in ``[qmin, qmin + 2^bits - 1]`` into a uint8 tensor, ``bits`` per value.

    Codes are offset by ``-qmin`` so they are non-negative; 4-bit codes pack two per byte,
    2-bit four per byte, 3-bit eight values in three bytes.
    """
    u = (q.reshape(-1).to(torch.int64) - qmin).cpu().numpy()
    if u.size and (u.min() < 0 or u.max() >= 2 ** bits):
        raise LowbitError(f"codes outside the {bits}-bit range starting at {qmin}")
    if bits > _WORD_BITS:
        bit_matrix = ((u[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
        return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))
    groups = np.zeros(-(-u.size // 8) * 8, np.uint64)  # zero padding: the last byte's spare bits stay 0
    groups[: u.size] = u
    groups = groups.reshape(-1, 8)
    word = np.zeros(len(groups), np.uint64)
    for i in range(8):
        word |= groups[:, i] << np.uint64(i * bits)
    packed = word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
    return torch.from_numpy(packed[: packed_nbytes(u.size, bits)].copy())


def unpack_codes(packed: Tensor, bits: int, qmin: int, count: int) -> Tensor:
    """Inverse of ``pack_codes``: ``count`` int32 codes."""
    raw = packed.cpu().numpy().astype(np.uint8).reshape(-1)
    if raw.size * 8 < count * bits:
        raise LowbitError("packed weight buffer is too short for its shape and bit width")
    if bits > _WORD_BITS:
        flat = np.unpackbits(raw, bitorder="little")
        bit_matrix = flat[: count * bits].reshape(count, bits).astype(np.int64)
        u = (bit_matrix << np.arange(bits)).sum(1)
        return torch.from_numpy(u + qmin).to(torch.int32)
    n_words = -(-count // 8)
    used = min(raw.size, n_words * bits)  # bytes past the last code (padding, extra) are ignored
    buf = np.zeros((n_words, 8), np.uint8)
    stream = np.zeros(n_words * bits, np.uint8)
    stream[:used] = raw[:used]
    buf[:, :bits] = stream.reshape(n_words, bits)
    word = buf.view("<u8").reshape(-1).astype(np.uint64)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    u = ((word[:, None] >> shifts) & np.uint64((1 << bits) - 1)).reshape(-1)[:count]
    return torch.from_numpy(u.astype(np.int64) + qmin).to(torch.int32)


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8
