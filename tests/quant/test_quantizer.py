"""WeightQuantizer / ActQuantizer: scale shapes per granularity, integer codes, signedness."""
from __future__ import annotations

import pytest
import torch

from lowbit import LowbitError
from lowbit.quant import ActQuantizer, WeightQuantizer
from lowbit.quant.quantizer import effective_groups
from lowbit.quant.ranges import minmax_range


def conv_weight(out_ch: int = 12, in_ch: int = 3, k: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # very different per-channel magnitudes, like folded BN weights
    return torch.randn(out_ch, in_ch, k, k, generator=g) * torch.logspace(-2, 1, out_ch).view(-1, 1, 1, 1)


@pytest.mark.parametrize("granularity, groups, expected", [
    ("tensor", None, 1),
    ("channel", None, 12),
    ("group", 1, 1),
    ("group", 3, 3),
    ("group", 4, 4),
    ("group", 12, 12),
    ("group", 5, 4),    # 5 does not divide 12: largest divisor of 12 not above 5
    ("group", 7, 6),
    ("group", 11, 6),
    ("group", 100, 12),  # more groups than channels: one per channel
])
def test_scale_shapes_per_granularity(granularity, groups, expected):
    wq = WeightQuantizer(4, 12, granularity, groups)
    assert wq.num_groups == expected
    assert wq.scale.shape == wq.zero_point.shape == (expected,)
    w = conv_weight()
    wq.calibrate(w, minmax_range)
    s, z = wq.channel_params(w.dim())
    assert s.shape == z.shape == (12, 1, 1, 1)
    # channels of one group share their scale, groups are consecutive channels
    per = 12 // expected
    flat = s.flatten()
    for gi in range(expected):
        block = flat[gi * per:(gi + 1) * per]
        assert torch.equal(block, block[:1].expand_as(block))
        # the group's scale comes from the group's own max |w|
        assert block[0].item() == pytest.approx(w[gi * per:(gi + 1) * per].abs().max().item() / 7, rel=1e-6)


def test_effective_groups_on_prime_channel_count():
    assert effective_groups(7, "group", 4) == 1
    assert effective_groups(10, "group", 4) == 2
    with pytest.raises(LowbitError):
        effective_groups(8, "group", 0)
    with pytest.raises(LowbitError):
        effective_groups(8, "rows", None)


def test_linear_weight_channel_params():
    wq = WeightQuantizer(4, 5, "channel")
    w = torch.randn(5, 7)
    wq.calibrate(w, minmax_range)
    s, _ = wq.channel_params(w.dim())
    assert s.shape == (5, 1)
    assert torch.allclose(s.flatten(), w.abs().amax(1) / 7)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("granularity, groups", [("tensor", None), ("channel", None), ("group", 4)])
def test_integer_codes_in_range(bits, granularity, groups):
    w = conv_weight()
    wq = WeightQuantizer(bits, 12, granularity, groups)
    wq.calibrate(w, minmax_range)
    res = wq.quantize(w)
    q = res.int_value
    assert q.dtype == torch.int32 and q.shape == w.shape
    qmin, qmax = wq.qrange
    assert q.min().item() >= qmin and q.max().item() <= qmax
    if bits == 1:
        assert wq.binary
        assert set(q.unique().tolist()) == {-1, 1}
        # binary scale is mean |w| per group and values are +-scale
        s, _ = wq.channel_params(w.dim())
        assert torch.equal(res.value, q.float() * s)
    else:
        assert not wq.binary
        if granularity == "channel":
            # per-channel max |w| lands exactly on +-qmax in every channel
            assert torch.equal(q.abs().flatten(1).amax(1), torch.full((12,), qmax, dtype=torch.int32))
    # the simulated weight used in forward equals the dequantized integers
    assert torch.equal(wq(w), res.value)
    assert torch.equal(wq.dequantize(q.float()), res.value)
    assert res.bits == bits


def test_more_bits_less_error():
    w = conv_weight()
    errors = []
    for bits in range(2, 9):
        wq = WeightQuantizer(bits, 12, "channel")
        wq.calibrate(w, minmax_range)
        errors.append((wq(w) - w).abs().max().item())
    assert all(b < a for a, b in zip(errors, errors[1:]))


def test_per_channel_beats_per_tensor_on_unbalanced_channels():
    w = conv_weight()
    err = {}
    for gran in ("tensor", "channel"):
        wq = WeightQuantizer(4, 12, gran)
        wq.calibrate(w, minmax_range)
        err[gran] = (wq(w) - w).pow(2).sum().item()
    assert err["channel"] < 0.5 * err["tensor"]


def test_asymmetric_weights_use_unsigned_codes():
    w = conv_weight() + 0.5
    wq = WeightQuantizer(4, 12, "channel", symmetric=False)
    wq.calibrate(w, minmax_range)
    assert not wq.signed and wq.qrange == (0, 15)
    q = wq.quantize(w).int_value
    assert q.min() >= 0 and q.max() <= 15
    assert (wq.zero_point != 0).any()
    assert torch.equal(wq.zero_point, wq.zero_point.round())


def test_disabled_weight_quantizer_is_identity():
    w = conv_weight()
    wq = WeightQuantizer(2, 12)
    wq.calibrate(w, minmax_range)
    wq.enabled = False
    assert wq(w) is w


# ---------------------------------------------------------------- activations

def _observe(aq: ActQuantizer, *batches: torch.Tensor):
    aq.start_observing()
    for b in batches:
        assert aq(b) is b  # observing passes the input through untouched
    return aq.stop_observing()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_act_quantizer_unsigned_after_relu(bits):
    x = torch.relu(torch.randn(4, 3, 5, 5))
    aq = ActQuantizer(bits)
    obs = _observe(aq, x)
    aq.calibrate(obs.values(), minmax_range)
    assert not aq.signed
    assert aq.qrange == (0, 2 ** bits - 1)
    assert aq.zero_point.item() == 0
    assert aq.scale.item() == pytest.approx(x.max().item() / (2 ** bits - 1), rel=1e-6)
    res = aq.quantize(x)
    assert res.int_value.min() >= 0 and res.int_value.max() <= 2 ** bits - 1
    assert torch.equal(aq(x), res.value)
    assert (aq(x) - x).abs().max() <= aq.scale.item() / 2 * (1 + 1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_act_quantizer_asymmetric_zero_point_for_signed_input(bits):
    x = torch.randn(4, 3, 5, 5) * 2 + 1  # mostly positive, some negative values
    aq = ActQuantizer(bits, symmetric=False)
    aq.calibrate(_observe(aq, x).values(), minmax_range)
    qmax = 2 ** bits - 1
    assert not aq.signed and aq.qrange == (0, qmax)
    lo, hi = x.min().item(), x.max().item()
    assert aq.scale.item() == pytest.approx((hi - lo) / qmax, rel=1e-5)
    z = aq.zero_point.item()
    assert 0 < z < qmax and z == round(z)
    assert z == pytest.approx(-lo / aq.scale.item(), abs=0.5 + 1e-4)
    # zero is exact, the observed range is covered within half a step
    assert aq(torch.zeros(3)).abs().max().item() == 0
    assert (aq(x) - x).abs().max() <= aq.scale.item() / 2 * (1 + 1e-4)


def test_act_quantizer_symmetric_for_signed_input():
    x = torch.randn(2, 3, 4, 4)
    aq = ActQuantizer(4, symmetric=True)
    aq.calibrate(_observe(aq, x).values(), minmax_range)
    assert aq.signed and aq.qrange == (-8, 7)
    assert aq.zero_point.item() == 0
    assert aq.scale.item() == pytest.approx(x.abs().max().item() / 7, rel=1e-5)
    # a ReLU input stays unsigned even for a symmetric quantizer
    aq2 = ActQuantizer(4, symmetric=True)
    aq2.calibrate(_observe(aq2, x.relu()).values(), minmax_range)
    assert not aq2.signed and aq2.qrange == (0, 15)


@pytest.mark.parametrize("shift", [0.0, 1.5, -1.5])
def test_one_bit_activation_is_affine_not_binary(shift):
    x = torch.randn(64, generator=torch.Generator().manual_seed(0)) + shift
    aq = ActQuantizer(1, symmetric=True)
    aq.calibrate(_observe(aq, x).values(), minmax_range)
    assert not aq.signed and aq.qrange == (0, 1)
    # two levels one step (the whole observed range) apart, zero being one of them (not sign codes)
    lo, hi = x.min().item(), x.max().item()
    s, z = aq.scale.item(), aq.zero_point.item()
    assert s == pytest.approx(hi - lo, rel=1e-6) and z == round(-lo / s) and z in (0, 1)
    levels = torch.tensor([-z * s, (1 - z) * s])
    assert 0.0 in levels.tolist()
    out = aq(x)
    assert torch.equal(out.unique(), levels)  # both levels used, nothing else
    # every value goes to the nearer level (the data has no value half-way between them)
    nearest = levels[(x.unsqueeze(1) - levels).abs().argmin(1)]
    assert torch.equal(out, nearest)


def test_observer_tracks_extremes_over_batches():
    a, b = torch.tensor([[0.5, 2.0]]), torch.tensor([[-3.0, 1.0]])
    aq = ActQuantizer(8)
    obs = _observe(aq, a, b)
    assert obs.lo == -3.0 and obs.hi == 2.0
    vals = obs.values()
    assert vals.min().item() == -3.0 and vals.max().item() == 2.0


def test_observer_subsamples_large_batches_deterministically():
    x = torch.randn(300_000)
    v1 = _observe(ActQuantizer(8), x).values()
    v2 = _observe(ActQuantizer(8), x).values()
    assert v1.numel() == 65536 + 2  # the sample plus the exact extremes
    assert torch.equal(v1, v2)
    assert v1.min().item() == x.min().item() and v1.max().item() == x.max().item()


def test_act_quantizer_without_data_or_bits():
    aq = ActQuantizer(4)
    aq.start_observing()
    with pytest.raises(LowbitError, match="saw no data"):
        aq.stop_observing()
    off = ActQuantizer(None)
    assert not off.enabled
    x = torch.randn(5)
    assert off(x) is x
    with pytest.raises(LowbitError):
        ActQuantizer(0)
