"""Property tests of the pure quantization functions (lowbit.quant.uniform) and range estimators."""
from __future__ import annotations


import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lowbit import LowbitError
from lowbit.quant import ranges
from lowbit.quant.uniform import (check_bits, dequantize_affine, fake_quantize, int_range, qparams_from_range,
                                  quantize_affine, to_int)

SETTINGS = settings(max_examples=60, deadline=None)
bits_st = st.integers(min_value=1, max_value=16)
floats32 = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


# ---------------------------------------------------------------- int_range / check_bits

@pytest.mark.parametrize("bits, signed, narrow, expected", [
    (4, True, True, (-7, 7)),
    (4, True, False, (-8, 7)),
    (4, False, False, (0, 15)),
    (4, False, True, (0, 15)),     # narrow only concerns signed codes
    (8, True, True, (-127, 127)),
    (8, True, False, (-128, 127)),
    (8, False, False, (0, 255)),
    (2, True, True, (-1, 1)),
    (2, True, False, (-2, 1)),
    (1, True, True, (-1, 1)),      # binary: the pair {-1, +1}
    (1, True, False, (-1, 1)),
    (1, False, False, (0, 1)),
    (16, True, False, (-32768, 32767)),
])
def test_int_range_table(bits, signed, narrow, expected):
    assert int_range(bits, signed, narrow) == expected


@given(bits=st.integers(2, 16), narrow=st.booleans())
@SETTINGS
def test_int_range_properties(bits, narrow):
    qmin, qmax = int_range(bits, True, narrow)
    assert qmax == 2 ** (bits - 1) - 1
    assert qmin == (-qmax if narrow else -qmax - 1)
    # the code fits in ``bits`` bits
    assert qmax - qmin + 1 <= 2 ** bits
    umin, umax = int_range(bits, False)
    assert (umin, umax) == (0, 2 ** bits - 1)


@pytest.mark.parametrize("bad", [0, 17, -4, 2.5, 4.0, True, False, "4", None])
def test_check_bits_rejects(bad):
    with pytest.raises(LowbitError, match="integer from 1 to 16"):
        check_bits(bad, "w_bits")
    with pytest.raises(LowbitError):
        int_range(bad, True)


@pytest.mark.parametrize("good", [1, 2, 8, 16])
def test_check_bits_accepts(good):
    assert check_bits(good) == good


# ---------------------------------------------------------------- quantize / dequantize

@st.composite
def affine_setup(draw):
    """bits, signedness, a scale, a zero point valid for the code range, and inputs."""
    bits = draw(st.integers(1, 8))
    signed = draw(st.booleans()) and bits > 1
    narrow = draw(st.booleans())
    qmin, qmax = int_range(bits, signed, narrow)
    scale = draw(st.floats(min_value=1e-3, max_value=10.0))
    zp = 0 if signed else draw(st.integers(qmin, qmax))
    x = draw(st.lists(floats32, min_size=1, max_size=64))
    return bits, qmin, qmax, torch.tensor(scale), torch.tensor(float(zp)), torch.tensor(x)


@given(affine_setup())
@SETTINGS
def test_quantize_affine_gives_integers_in_range(setup):
    _, qmin, qmax, s, z, x = setup
    q = quantize_affine(x, s, z, qmin, qmax)
    assert torch.equal(q, q.round())
    assert q.min() >= qmin and q.max() <= qmax
    qi = to_int(x, s, z, qmin, qmax)
    assert qi.dtype == torch.int32
    assert torch.equal(qi.float(), q)


@given(affine_setup(), st.data())
@SETTINGS
def test_roundtrip_error_at_most_half_a_step_inside_range(setup, data):
    _, qmin, qmax, s, z, _ = setup
    lo, hi = ((qmin - z) * s).item(), ((qmax - z) * s).item()
    u = torch.tensor(data.draw(st.lists(st.floats(0, 1), min_size=1, max_size=64)))
    x = lo + u * (hi - lo)
    err = (dequantize_affine(quantize_affine(x, s, z, qmin, qmax), s, z) - x).abs()
    tol = s.item() / 2 * (1 + 1e-5) + 1e-6 * x.abs().max().item()
    assert err.max().item() <= tol


@given(affine_setup())
@SETTINGS
def test_roundtrip_clamps_outside_range(setup):
    _, qmin, qmax, s, z, x = setup
    y = dequantize_affine(quantize_affine(x, s, z, qmin, qmax), s, z)
    lo, hi = (qmin - z) * s, (qmax - z) * s
    assert (y >= lo - 1e-6).all() and (y <= hi + 1e-6).all()
    big = torch.tensor([hi.item() + 100 * s.item(), lo.item() - 100 * s.item()])
    assert torch.allclose(dequantize_affine(quantize_affine(big, s, z, qmin, qmax), s, z), torch.stack([hi, lo]))


@given(affine_setup())
@SETTINGS
def test_fake_quantize_equals_dequantize_of_quantize(setup):
    _, qmin, qmax, s, z, x = setup
    x_before = x.clone()
    expected = dequantize_affine(quantize_affine(x, s, z, qmin, qmax), s, z)
    assert torch.equal(fake_quantize(x, s, z, qmin, qmax), expected)             # inference path
    assert torch.equal(fake_quantize(x.clone().requires_grad_(), s, z, qmin, qmax).detach(), expected)  # STE path
    assert torch.equal(x, x_before)  # the input is not modified in place


@given(affine_setup(), st.data())
@SETTINGS
def test_ste_gradient_one_inside_zero_outside(setup, data):
    _, qmin, qmax, s, z, _ = setup
    sv, zv = s.item(), z.item()
    inside = [data.draw(st.floats(qmin - zv, qmax - zv)) * sv for _ in range(8)]
    outside = [(qmax - zv + 1 + data.draw(st.floats(0, 50))) * sv for _ in range(4)]
    outside += [(qmin - zv - 1 - data.draw(st.floats(0, 50))) * sv for _ in range(4)]
    x = torch.tensor(inside + outside, requires_grad=True)
    fake_quantize(x, s, z, qmin, qmax).sum().backward()
    assert torch.equal(x.grad[:8], torch.ones(8))
    assert torch.equal(x.grad[8:], torch.zeros(8))


def test_ste_gradient_flows_to_per_channel_inputs():
    x = torch.linspace(-3, 3, 24).reshape(4, 6).requires_grad_()
    s = torch.tensor([0.1, 0.2, 0.5, 1.0]).view(4, 1)
    y = fake_quantize(x, s, torch.zeros(4, 1), -7, 7)
    y.sum().backward()
    inside = (x.detach() / s).round().abs() <= 7
    assert torch.equal(x.grad, inside.float())
    assert not inside.all() and inside.any()


@given(st.lists(floats32, min_size=1, max_size=64), st.floats(1e-3, 10))
@SETTINGS
def test_binary_quantization_is_sign_times_scale(xs, scale):
    x = torch.tensor(xs)
    s = torch.tensor(scale)
    qmin, qmax = int_range(1, True)
    codes = to_int(x, s, torch.zeros(()), qmin, qmax, binary=True)
    assert set(codes.unique().tolist()) <= {-1, 1}
    assert torch.equal(codes, torch.where(x >= 0, 1, -1).to(torch.int32))
    assert torch.equal(fake_quantize(x, s, torch.zeros(()), qmin, qmax, binary=True), codes.float() * s)
    xg = x.clone().requires_grad_()
    assert torch.equal(fake_quantize(xg, s, torch.zeros(()), qmin, qmax, binary=True).detach(), codes.float() * s)


# ---------------------------------------------------------------- qparams_from_range

@st.composite
def range_setup(draw):
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    narrow = draw(st.booleans())
    lo = draw(st.floats(-100, 50))
    hi = draw(st.floats(-50, 100))
    assume(hi - lo > 1e-2)
    return bits, symmetric, narrow, lo, hi


@given(range_setup(), st.lists(st.floats(0, 1), min_size=1, max_size=64))
@SETTINGS
def test_qparams_cover_the_range(setup, us):
    bits, symmetric, narrow, lo, hi = setup
    s, z = qparams_from_range(torch.tensor([lo]), torch.tensor([hi]), bits, symmetric, symmetric, narrow)
    qmin, qmax = int_range(bits, symmetric, narrow)
    assert s.item() > 0
    assert torch.equal(z, z.round()) and qmin <= z.item() <= qmax
    # zero is exactly representable (padding and ReLU zeros stay exact)
    assert fake_quantize(torch.zeros(1), s, z, qmin, qmax).item() == 0.0
    # every x in [lo, hi] is within half a step of its quantized value
    x = lo + torch.tensor(us) * (hi - lo)
    x = torch.cat([x, torch.tensor([lo, hi])])
    err = (fake_quantize(x, s, z, qmin, qmax) - x).abs().max().item()
    assert err <= s.item() / 2 * (1 + 1e-4) + 1e-5
    # and the step is no larger than needed
    span = max(hi, 0) - min(lo, 0)
    if symmetric:
        assert s.item() == pytest.approx(max(-min(lo, 0), max(hi, 0)) / qmax, rel=1e-5)
    else:
        assert s.item() == pytest.approx(span / (2 ** bits - 1), rel=1e-5)


def test_qparams_per_group_shapes():
    lo = torch.tensor([-1.0, -2.0, 0.0])
    hi = torch.tensor([2.0, 0.5, 3.0])
    s, z = qparams_from_range(lo, hi, 4, True, True, True)
    assert s.shape == z.shape == (3,)
    assert torch.allclose(s, torch.tensor([2 / 7, 2 / 7, 3 / 7]))
    assert torch.equal(z, torch.zeros(3))
    s, z = qparams_from_range(lo, hi, 4, False, False)
    assert torch.allclose(s, torch.tensor([3 / 15, 2.5 / 15, 3 / 15]))
    assert torch.equal(z, torch.tensor([5.0, 12.0, 0.0]))  # zero point = -lo / scale


def test_qparams_degenerate_range_is_finite():
    s, z = qparams_from_range(torch.zeros(2), torch.zeros(2), 4, False, False)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(fake_quantize(torch.zeros(2), s, z, 0, 15), torch.zeros(2))


# ---------------------------------------------------------------- range estimators

def _rows(seed: int, kind: str, rows: int = 6, n: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        x = torch.randn(rows, n, generator=g)
    elif kind == "laplace":
        u = torch.rand(rows, n, generator=g) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    elif kind == "relu":
        x = torch.randn(rows, n, generator=g).clamp_min(0)
    else:  # gaussian with two large outliers per row
        x = torch.randn(rows, n, generator=g)
        x[:, 0], x[:, 1] = 10.0, -8.0
    return x * (torch.rand(rows, 1, generator=g) * 3 + 0.1)


def _quant_error(x, lo, hi, bits, signed, symmetric, narrow, p):
    s, z = qparams_from_range(lo, hi, bits, signed, symmetric, narrow)
    qmin, qmax = int_range(bits, signed and symmetric, narrow)
    y = fake_quantize(x, s.unsqueeze(1), z.unsqueeze(1), qmin, qmax)
    return (y - x).abs().pow(p).mean(1)


@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["gauss", "laplace", "relu", "outliers"]),
       bits=st.integers(2, 8), symmetric=st.booleans(), p=st.sampled_from([2.0, 2.4, 3.0]))
@settings(max_examples=30, deadline=None)
def test_lp_search_never_worse_than_minmax(seed, kind, bits, symmetric, p):
    x = _rows(seed, kind)
    signed = symmetric
    kw = dict(bits=bits, signed=signed, symmetric=symmetric, narrow=True)
    lo_m, hi_m = ranges.minmax_range(x, **kw)
    lo_s, hi_s = ranges.lp_search_range(x, p=p, **kw)
    e_min = _quant_error(x, lo_m, hi_m, bits, signed, symmetric, True, p)
    e_lp = _quant_error(x, lo_s, hi_s, bits, signed, symmetric, True, p)
    assert (e_lp <= e_min * (1 + 1e-6) + 1e-12).all()
    # the search only shrinks the observed range
    assert (lo_s >= lo_m - 1e-6).all() and (hi_s <= hi_m + 1e-6).all()


def test_lp_search_clips_outliers_at_low_bits():
    x = _rows(0, "outliers")
    lo, hi = ranges.lp_search_range(x, bits=3, signed=True, symmetric=True, narrow=True)
    lo0, hi0 = ranges.minmax_range(x)
    assert (hi < hi0).all() and (lo > lo0).all()
    e_min = _quant_error(x, lo0, hi0, 3, True, True, True, 2.0)
    e_lp = _quant_error(x, lo, hi, 3, True, True, True, 2.0)
    assert (e_lp < 0.8 * e_min).all()


def test_minmax_range_is_row_min_max():
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, 4.0]])
    lo, hi = ranges.minmax_range(x)
    assert torch.equal(lo, torch.tensor([-2.0, 0.25]))
    assert torch.equal(hi, torch.tensor([3.0, 4.0]))


def test_aciq_alpha_table():
    assert ranges.aciq_alpha(2) == 2.83
    assert ranges.aciq_alpha(4) == 5.03
    assert ranges.aciq_alpha(2, "laplace") == 2.83
    assert ranges.aciq_alpha(4, "gauss") == 2.55
    assert ranges.aciq_alpha(8) == 9.89


def test_aciq_alpha_extrapolates_monotonically():
    for dist in ("laplace", "gauss"):
        alphas = [ranges.aciq_alpha(b, dist) for b in range(1, 17)]
        assert all(a > 0 for a in alphas)
        assert all(b > a for a, b in zip(alphas, alphas[1:]))
    with pytest.raises(LowbitError, match="laplace"):
        ranges.aciq_alpha(4, "cauchy")


@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["gauss", "laplace", "outliers"]),
       bits=st.integers(2, 8), symmetric=st.booleans(), dist=st.sampled_from(["laplace", "gauss"]))
@settings(max_examples=30, deadline=None)
def test_aciq_clips_inside_minmax(seed, kind, bits, symmetric, dist):
    x = _rows(seed, kind)
    lo, hi = ranges.aciq_range(x, bits=bits, signed=symmetric, symmetric=symmetric, dist=dist)
    lo0, hi0 = ranges.minmax_range(x)
    assert (lo >= lo0).all() and (hi <= hi0).all()
    assert (lo < 0).all() and (hi > 0).all()


def test_aciq_laplace_value_two_sided():
    # b = mean |x - mean| = 1 for this row (mean 0), so alpha = 5.03 at 4 bits
    x = torch.tensor([[-1.0, 1.0] * 50 + [-10.0, 10.0]])
    b = (x - x.mean()).abs().mean().item()
    lo, hi = ranges.aciq_range(x, bits=4, signed=True, symmetric=True)
    assert hi.item() == pytest.approx(5.03 * b, rel=1e-5)
    assert lo.item() == pytest.approx(-5.03 * b, rel=1e-5)


def test_aciq_one_sided_uses_one_more_bit():
    x = _rows(3, "relu")
    lo, hi = ranges.aciq_range(x, bits=4, signed=False, symmetric=False)
    b = (x - x.mean(1, keepdim=True)).abs().mean(1)
    assert torch.equal(lo, x.amin(1))
    assert torch.allclose(hi, torch.minimum(x.amax(1), ranges.aciq_alpha(5) * b))


@pytest.mark.filterwarnings("ignore:std\\(\\)")
def test_aciq_gauss_single_element_rows_are_finite():
    x = torch.tensor([[0.5], [-0.25], [2.0]])
    lo, hi = ranges.aciq_range(x, bits=4, signed=True, symmetric=True, dist="gauss")
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()


def test_aciq_symmetric_range_contains_the_bulk_of_an_offset_row():
    g = torch.Generator().manual_seed(0)
    # one channel of positive weights near 1 (e.g. a smoothing depthwise kernel), one zero-mean channel
    x = torch.stack([1 + 0.05 * torch.randn(9, generator=g), 0.3 * torch.randn(9, generator=g)])
    lo, hi = ranges.aciq_range(x, bits=4, signed=True, symmetric=True, narrow=True)
    assert (lo <= hi).all()
    mean = x.mean(1)
    assert ((lo <= mean) & (mean <= hi)).all()


@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["gauss", "relu", "outliers"]),
       bits=st.integers(2, 8), symmetric=st.booleans(), p=st.sampled_from([2.0, 2.4]))
@settings(max_examples=20, deadline=None)
def test_lp_search_picks_the_least_error_ratio_of_its_grid(seed, kind, bits, symmetric, p):
    """The in-place search returns, per row, exactly the first grid ratio of least error, as the
    plain expression ``((clamp(round(x / s) + z) - z) * s - x).abs().pow(p).mean()`` ranks them."""
    x = _rows(seed, kind)
    kw = dict(bits=bits, signed=symmetric, symmetric=symmetric, narrow=False)
    lo, hi = ranges.lp_search_range(x, p=p, candidates=40, shrink=0.02, **kw)
    lo0, hi0 = x.amin(1), x.amax(1)
    qmin, qmax = int_range(bits, True, False) if symmetric else int_range(bits, False)
    errs, los, his = [], [], []
    for i in range(40):
        los.append(lo0 * (1.0 - 0.02 * i))
        his.append(hi0 * (1.0 - 0.02 * i))
        s, z = qparams_from_range(los[-1], his[-1], bits, symmetric, symmetric, False)
        s, z = s.unsqueeze(1), z.unsqueeze(1)
        errs.append(((torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s - x).abs().pow(p).mean(1))
    best = torch.stack(errs).argmin(0, keepdim=True)  # the first of equal minima, as the strict search keeps
    assert torch.equal(lo, torch.stack(los).gather(0, best)[0]) and torch.equal(hi, torch.stack(his).gather(0, best)[0])
