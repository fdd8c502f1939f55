"""Dense bit packing of integer weight codes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import LowbitError
from lowbit.deploy import pack_codes, unpack_codes
from lowbit.deploy.packing import packed_nbytes
from lowbit.quant.uniform import int_range


@st.composite
def code_arrays(draw, max_bits: int = 8):
    bits = draw(st.integers(1, max_bits))
    signed = draw(st.booleans())
    narrow = draw(st.booleans())
    if bits == 1 and signed:
        qmin, qmax = -1, 0          # how the artifact stores binary {-1, +1}
    else:
        qmin, qmax = int_range(bits, signed, narrow)
    n = draw(st.integers(0, 300))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    codes = torch.randint(qmin, qmax + 1, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    # make sure the extremes are present
    if n >= 2:
        codes[0], codes[-1] = qmin, qmax
    return bits, qmin, codes


@given(code_arrays())
@settings(max_examples=200, deadline=None)
def test_pack_unpack_roundtrip(arg):
    bits, qmin, codes = arg
    packed = pack_codes(codes, bits, qmin)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(codes.numel() * bits / 8) == packed_nbytes(codes.numel(), bits)
    out = unpack_codes(packed, bits, qmin, codes.numel())
    assert out.dtype == torch.int32
    assert torch.equal(out, codes)


@given(code_arrays(max_bits=16), st.lists(st.integers(1, 5), min_size=1, max_size=3))
@settings(max_examples=50, deadline=None)
def test_pack_any_shape_up_to_16_bits(arg, dims):
    bits, qmin, _ = arg
    n = math.prod(dims)
    gen = torch.Generator().manual_seed(n * bits)
    codes = torch.randint(qmin, qmin + 2 ** bits, dims, generator=gen, dtype=torch.int64)
    out = unpack_codes(pack_codes(codes, bits, qmin), bits, qmin, n)
    assert torch.equal(out.view(dims).long(), codes)


@pytest.mark.parametrize("bits, n, nbytes", [
    (4, 2, 1), (4, 3, 2), (4, 100, 50),      # two 4-bit codes per byte
    (2, 4, 1), (2, 5, 2), (2, 100, 25),      # four 2-bit codes per byte
    (3, 8, 3), (3, 16, 6), (3, 9, 4),        # eight 3-bit codes in three bytes
    (1, 8, 1), (1, 9, 2), (8, 7, 7), (5, 8, 5), (16, 3, 6), (7, 0, 0),
])
def test_packed_size_is_exact(bits, n, nbytes):
    codes = torch.zeros(n, dtype=torch.int32)
    assert pack_codes(codes, bits, 0).numel() == nbytes == packed_nbytes(n, bits)


def test_bit_layout_is_little_endian():
    # 4-bit: first value in the low nibble
    assert pack_codes(torch.tensor([1, 2]), 4, 0).tolist() == [0x21]
    # 2-bit: values 0, 1, 2, 3 from the least significant bits up
    assert pack_codes(torch.tensor([0, 1, 2, 3]), 2, 0).tolist() == [0b11100100]
    # signed codes are offset by -qmin: -8..7 -> 0..15
    assert pack_codes(torch.tensor([-8, 7]), 4, -8).tolist() == [0xF0]
    # 3-bit values straddle byte boundaries: 8 x 0b111 fill 3 bytes
    assert pack_codes(torch.full((8,), 7), 3, 0).tolist() == [255, 255, 255]
    assert pack_codes(torch.tensor([0, 0, 7]), 3, 0).tolist() == [0b11000000, 0b00000001]


@pytest.mark.parametrize("codes, bits, qmin", [
    ([16], 4, 0), ([-1], 4, 0), ([8], 4, -8), ([-9], 4, -8), ([2], 1, 0), ([4], 2, 0),
])
def test_pack_rejects_out_of_range(codes, bits, qmin):
    with pytest.raises(LowbitError, match=f"outside the {bits}-bit range"):
        pack_codes(torch.tensor(codes), bits, qmin)


def test_unpack_rejects_short_buffer():
    packed = pack_codes(torch.arange(8), 4, 0)
    with pytest.raises(LowbitError, match="too short"):
        unpack_codes(packed, 4, 0, 9)
    # padding bits beyond ``count`` are ignored
    assert unpack_codes(pack_codes(torch.arange(3), 4, 0), 4, 0, 3).tolist() == [0, 1, 2]


def test_pack_accepts_numpy_compatible_int_dtypes():
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        codes = torch.tensor([0, 1, 2, 3, 3], dtype=dtype)
        assert unpack_codes(pack_codes(codes, 2, 0), 2, 0, 5).tolist() == [0, 1, 2, 3, 3]
    np.testing.assert_array_equal(pack_codes(torch.tensor([5, 10]), 4, 0).numpy(), np.array([0xA5], np.uint8))


def _reference_pack(u: np.ndarray, bits: int) -> np.ndarray:
    """The layout by definition: value j's bit k is bit j * bits + k of the stream, LSB first in each byte."""
    bit_matrix = ((u[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 61])
def test_packed_bytes_follow_the_stream_layout(bits, n):
    """The word-wise fast path (up to 8 bits) writes exactly the bytes of the bit-stream definition,
    and unpacking ignores trailing bytes beyond the last code."""
    u = np.random.default_rng(bits * 100 + n).integers(0, 2 ** bits, n)
    packed = pack_codes(torch.from_numpy(u), bits, 0)
    np.testing.assert_array_equal(packed.numpy(), _reference_pack(u, bits))
    padded = torch.cat([packed, torch.full((3,), 255, dtype=torch.uint8)])
    assert unpack_codes(padded, bits, 0, n).tolist() == u.tolist()
