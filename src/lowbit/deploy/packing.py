"""Dense bit packing of integer codes: any width 1..16, little-endian bit order within bytes; rows of
codes at their own widths (per-channel widths) as one run per width."""
from __future__ import annotations

from typing import Sequence

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
    """Bytes of ``count`` codes packed at ``bits`` each (the last byte padded with zero bits)."""
    return (count * bits + 7) // 8


def pack_rows(u: Tensor, widths: Sequence[int]) -> dict[int, Tensor]:
    """Pack rows of non-negative codes, row ``g`` at ``widths[g]`` bits (0: the row stores nothing).

    ``u``: (rows, n) codes, row ``g`` in ``[0, 2^widths[g])``. Returns one packed run per width
    present, its rows in order (``pack_codes`` of their concatenation, byte-aligned per run).
    """
    if u.dim() != 2 or u.shape[0] != len(widths):
        raise LowbitError(f"pack_rows needs one width per row ({u.shape[0] if u.dim() == 2 else '?'} rows), "
                          f"got {len(widths)}")
    runs = {}
    for b in sorted(set(widths) - {0}):
        idx = torch.tensor([g for g, w in enumerate(widths) if w == b])
        runs[b] = pack_codes(u[idx], b, 0)
    return runs


def unpack_rows(runs: dict[int, Tensor], widths: Sequence[int], n: int) -> Tensor:
    """Inverse of ``pack_rows``: (rows, ``n``) int64 codes, 0 in rows of width 0."""
    out = torch.zeros(len(widths), n, dtype=torch.int64)
    for b in sorted(set(widths) - {0}):
        idx = torch.tensor([g for g, w in enumerate(widths) if w == b])
        out[idx] = unpack_codes(runs[b], b, 0, len(idx) * n).to(torch.int64).view(len(idx), n)
    return out


def rows_nbytes(n: int, widths: Sequence[int]) -> dict[int, int]:
    """Bytes of each run ``pack_rows`` writes for rows of ``n`` codes at ``widths``."""
    return {b: packed_nbytes(n * sum(w == b for w in widths), b) for b in sorted(set(widths) - {0})}
