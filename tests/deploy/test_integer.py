"""Integer-only reference path: agreement with the simulation, fixed-point arithmetic, bad input."""
from __future__ import annotations

import random
import warnings
from fractions import Fraction

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError
from lowbit.deploy.integer import (IntClamp, fixed_point_rescale, integer_agreement, integer_model,
                                   quantize_multiplier, with_int32_bias)
from lowbit.quant.layers import quant_layers
from lowbit.quant.quantizer import WeightQuantizer
from tests.conftest import ZOO_SPECS, calib_tensor, make_model

CONFIGS = {"W8A8": (8, 8), "W4A4": (4, 4), "W2A4": (2, 4)}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(ZOO_SPECS))
def test_zoo_integer_path_agrees_with_simulation(name, config) -> None:
    w_bits, a_bits = CONFIGS[config]
    q = lowbit.quantize(make_model(name), calib_tensor(16), w_bits=w_bits, a_bits=a_bits, method="minmax")
    images = calib_tensor(64, seed=7)
    device = integer_model(q)
    layers = dict(quant_layers(q))
    # every layer with a quantized input accumulates in integers; by the protocol only the first does not
    assert set(device.integer_layers) == {n for n, l in layers.items() if l.input_quant.enabled}
    assert device.traced and device.requantized, "conv -> ReLU -> conv chains requantize in fixed point"
    # int32 biases: the device equals the simulation with int32-rounded biases; with 16 fractional
    # bias bits it reproduces the unmodified simulation
    res = integer_agreement(with_int32_bias(q), images, device)
    assert res["fits_int32"]
    res16 = integer_agreement(q, images, integer_model(q, bias_frac_bits=16))
    with torch.no_grad():
        logit_scale = q(images).abs().max().item()
    for r in (res, res16):
        assert r["argmax_agreement"] == 100.0, r
        # the accumulators are exact, so a code differs only where the simulation's float sums or
        # the fixed-point requantization land a value on the other side of a rounding boundary:
        # none in these 64 images at sub-8-bit codes; at 8 bits, with 16x finer steps, a few codes
        # in ten thousand, a few steps apart once propagated
        assert r["code_agreement"] >= (99.99 if a_bits < 8 else 99.8) and r["max_code_diff"] <= 8, r
        if a_bits < 8:
            assert r["max_abs_diff"] <= 1e-2 * logit_scale, r


def test_fully_integer_network_and_untraceable_fallback() -> None:
    q = lowbit.quantize(make_model("zoofree"), calib_tensor(16), w_bits=4, a_bits=4, quantize_all=True)
    device = integer_model(q)
    assert len(device.integer_layers) == len(device.layers)  # the input is quantized too
    res = integer_agreement(with_int32_bias(q), calib_tensor(8, seed=1), device)
    assert res["code_agreement"] == 100.0 and res["argmax_agreement"] == 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BN folding's own notice that the model does not trace
        qu = lowbit.quantize(make_model("untraceable"), calib_tensor(16), w_bits=4, a_bits=4)
    device = integer_model(qu)
    assert not device.traced and device.requantized == []  # every layer output goes back to float
    res = integer_agreement(with_int32_bias(qu), calib_tensor(8, seed=1), device)
    assert res["code_agreement"] == 100.0 and res["max_abs_diff"] < 1e-4


def test_weights_only_model_uses_integer_weights_in_float() -> None:
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=3, a_bits=None)
    device = integer_model(q)
    assert device.integer_layers == [] and device.requantized == []
    x = calib_tensor(8, seed=2)
    assert torch.allclose(device(x), q(x), rtol=1e-4, atol=1e-5)


def test_quantize_multiplier_is_a_normalized_int32_fraction() -> None:
    m = torch.tensor([1e-6, 3.3e-4, 0.0123, 0.5, 0.999999, 1.0, 7.25, 1234.5], dtype=torch.float64)
    m0, shift = quantize_multiplier(m)
    assert ((m0 >= 2 ** 30) & (m0 < 2 ** 31)).all()
    approx = m0.double() / 2.0 ** shift.double()
    assert ((approx - m).abs() / m <= 2.0 ** -30).all()
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(LowbitError):
            quantize_multiplier(torch.tensor([bad]))


def test_fixed_point_rescale_rounds_half_up_exactly() -> None:
    rng = random.Random(0)
    acc = torch.tensor([rng.randint(-2 ** 31 + 1, 2 ** 31 - 1) for _ in range(500)] + [0, 1, -1, 5, -5],
                       dtype=torch.int64)
    m0 = torch.tensor(rng.randint(2 ** 30, 2 ** 31 - 1), dtype=torch.int64)
    shift = torch.tensor(40, dtype=torch.int64)
    got = fixed_point_rescale(acc, m0, shift)
    for a, g in zip(acc.tolist(), got.tolist()):
        exact = Fraction(a * int(m0), 2 ** 40)
        assert g == (exact + Fraction(1, 2)).__floor__()  # round half up
    ties = fixed_point_rescale(torch.tensor([1, 3, -1, -3]), torch.tensor(2 ** 30), torch.tensor(31))
    assert ties.tolist() == [1, 2, 0, -1]  # x.5 goes up


def test_int_clamp_commutes_with_rounding() -> None:
    """ReLU6 then round == round then clamp to [z, z + round(6 / s)] (rounding is monotone)."""
    s, z = 0.037, 0
    y = torch.linspace(-3, 9, 10001)
    sim = torch.clamp(torch.round(torch.clamp(y, 0, 6) / s) + z, 0, 255)
    hi = z + int(torch.round(torch.tensor(6.0) / torch.tensor(s)))
    dev = IntClamp(z, hi)(torch.clamp(torch.round(y / s) + z, 0, 255))
    assert torch.equal(sim, dev)


class _TanhWeights(WeightQuantizer):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w)


def test_bad_input() -> None:
    with pytest.raises(LowbitError, match="never quantized"):
        integer_model(make_model("resnet20"))
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=4, a_bits=4)
    for bad in (-1, 17, 2.5, "8"):
        with pytest.raises(LowbitError, match="bias_frac_bits"):
            integer_model(q, bias_frac_bits=bad)
    layer = dict(quant_layers(q))["layers.0.0.conv1"]
    layer.weight_quant = _TanhWeights(4, layer.out_channels)
    with pytest.raises(LowbitError, match="integer"):
        integer_model(q)
    with pytest.raises(LowbitError, match="never quantized"):
        with_int32_bias(nn.Conv2d(1, 1, 1))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_per_layer_and_per_channel_widths_with_pruned_channels(symmetric, tmp_path) -> None:
    """Per-layer widths, per-channel widths (binary and pruned channels): the integer path equals the
    simulation with int32 biases code for code, from the model and from its (version-5) artifact."""
    from tests.deploy.test_channel_widths_size import CHANNEL_MAP

    q = lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=4, a_bits=4, w_symmetric=symmetric,
                        layer_bits=CHANNEL_MAP)
    device = integer_model(q)
    images = calib_tensor(16, seed=1)
    res = integer_agreement(with_int32_bias(q), images, device)
    assert res["code_agreement"] == 100.0 and res["argmax_agreement"] == 100.0 and res["max_code_diff"] == 0, res
    assert set(CHANNEL_MAP) - {"fc"} <= set(device.integer_layers) and device.requantized
    for name, widths in CHANNEL_MAP.items():
        if not isinstance(widths, list):
            continue
        w = device.layers[name].w_centered  # q_w - z_w: pruned channels 0, binary ones +-1 (symmetric)
        for c, b in enumerate(widths):
            if b == 0:
                assert not w[c].any(), (name, c)
            elif b == 1 and symmetric:
                assert set(w[c].unique().tolist()) <= {-1, 1}, (name, c)
            else:
                assert int(w[c].max()) - int(w[c].min()) <= 2 ** b - 1, (name, c)
    loaded = integer_model(lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), model=make_model("resnet20")))
    with torch.no_grad():
        assert torch.equal(loaded(images), device(images))
