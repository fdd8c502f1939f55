"""ACIQ-Mix: per-channel bit allocation under an average width, ACIQ clips per width, bias correction, export."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lowbit
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.ptq.aciq_mix import AciqMixOptions, allocate_bits, calibrate_mixed_weights, correct_variance, mean_inputs
from lowbit.ptq.common import quantizers_disabled
from lowbit.quant.layers import quant_layers
from lowbit.quant.quantizer import WeightQuantizer
from lowbit.quant.ranges import ACIQ_GAUSS, ACIQ_LAPLACE

from ..conftest import calib_tensor, make_model
from ..deploy.test_onnx import assert_matches_simulation, export as export_onnx


def test_aciq_mix_is_registered() -> None:
    assert "aciq-mix" in lowbit.methods()


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 100])
@pytest.mark.parametrize("budget", [2, 3, 4, 5, 8])
def test_allocation_meets_the_average_exactly_within_bounds(n: int, budget: int) -> None:
    gen = torch.Generator().manual_seed(n * 10 + budget)
    ranges = torch.rand(n, generator=gen).pow(4) * 10  # spread over decades: the bounds bind
    bits = allocate_bits(ranges, budget, min_bits=2, max_bits=8)
    assert bits.dtype == torch.int64 and bits.shape == (n,)
    assert int(bits.sum()) == n * budget  # mean == budget: never above it, nothing left unused
    assert int(bits.min()) >= 2 and int(bits.max()) <= 8


def test_larger_ranges_get_more_bits_by_the_two_thirds_law() -> None:
    ranges = torch.tensor([1.0, 8.0, 64.0, 8.0, 1.0, 64.0])
    bits = allocate_bits(ranges, 4, min_bits=2, max_bits=16)
    # 2^M ~ r^(2/3): the real-valued widths b + (2/3)(log2 r - mean log2 r) are integers here
    assert bits.tolist() == [2, 4, 6, 4, 2, 6]
    gen = torch.Generator().manual_seed(1)
    ranges = torch.rand(50, generator=gen) * 5
    bits = allocate_bits(ranges, 3, 2, 8)
    order = torch.argsort(ranges)
    assert torch.all(bits[order].diff() >= 0) and bits.max() > bits.min()  # never fewer bits for a larger range


def test_allocation_rounds_ties_and_refuses_an_impossible_budget() -> None:
    assert allocate_bits(torch.ones(5), 3).tolist() == [3] * 5  # equal ranges: everyone at the budget
    assert allocate_bits(torch.tensor([0.0, 0.0, 1.0]), 3, 2, 8).sum() == 9  # zero ranges still meet the average
    with pytest.raises(LowbitError, match="budget"):
        allocate_bits(torch.ones(3), 9, 2, 8)


def _laplace_mse(alpha: float, b: float, bits: int) -> float:
    """Clipping plus rounding noise of Laplace(b) clipped at alpha with 2^bits levels (Banner et al. eq. 5)."""
    return 2 * b * b * math.exp(-alpha / b) + alpha * alpha / (3 * 4 ** bits)


def _gauss_mse(alpha: float, sigma: float, bits: int) -> float:
    """The same for N(0, sigma^2): clipping noise of both tails plus the rounding noise."""
    tail = (alpha * alpha + sigma * sigma) * math.erfc(alpha / (math.sqrt(2) * sigma)) \
        - alpha * sigma * math.sqrt(2 / math.pi) * math.exp(-alpha * alpha / (2 * sigma * sigma))
    return tail + alpha * alpha / (3 * 4 ** bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_aciq_constants_minimise_the_laplace_and_gauss_noise(bits: int) -> None:
    grid = [i / 1000 for i in range(500, 15000)]
    best_l = min(grid, key=lambda a: _laplace_mse(a, 1.0, bits))
    best_g = min(grid, key=lambda a: _gauss_mse(a, 1.0, bits))
    assert best_l == pytest.approx(ACIQ_LAPLACE[bits], abs=0.02)
    assert best_g == pytest.approx(ACIQ_GAUSS[bits], abs=0.02)


@pytest.mark.parametrize("dist", ["laplace", "gauss"])
def test_each_channel_is_clipped_for_its_own_width(dist: str) -> None:
    torch.manual_seed(0)
    spreads = torch.tensor([0.05, 0.2, 1.0, 3.0])
    w = torch.distributions.Laplace(0.0, 1.0).sample((4, 4096)) * spreads[:, None]
    w[:, 0] = 40 * spreads  # an outlier per channel: the clip, not the max, sets the scale
    wq = WeightQuantizer(4, 4, "channel")
    calibrate_mixed_weights(wq, w, AciqMixOptions(dist=dist))
    bits = torch.tensor(wq.group_bits)
    assert bits.sum() == 16 and wq.bits == int(bits.max())
    for c, m in enumerate(bits.tolist()):
        row = w[c]
        spread = row.abs().mean() if dist == "laplace" else row.pow(2).mean().sqrt()
        alpha = (ACIQ_LAPLACE if dist == "laplace" else ACIQ_GAUSS)[m] * spread
        assert wq.scale[c].item() == pytest.approx(alpha.item() / (2 ** (m - 1) - 1), rel=1e-5)
    codes = wq.quantize(w).int_value
    for c, m in enumerate(bits.tolist()):
        assert codes[c].abs().max() == 2 ** (m - 1) - 1  # clamped to the channel's own narrow range


def _layer_inputs(qmodel: torch.nn.Module, images: torch.Tensor, name: str) -> torch.Tensor:
    layer = dict(quant_layers(qmodel))[name]
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad(), quantizers_disabled(qmodel):
        qmodel(images)
    handle.remove()
    return torch.cat(seen)


def _channel_means(layer: torch.nn.Module, x: torch.Tensor, weights_quantized: bool) -> torch.Tensor:
    wq, aq = layer.weight_quant, layer.input_quant
    saved = wq.enabled, aq.enabled
    wq.enabled, aq.enabled = weights_quantized, False
    with torch.no_grad():
        y = layer(x)
    wq.enabled, aq.enabled = saved
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(1)


def test_bias_correction_matches_each_output_channels_mean() -> None:
    fp, calib = make_model("resnet20"), calib_tensor(16)
    # no correction at all: its layers in FP mode are the FP network (folded), weights and biases
    plain = lowbit.quantize(fp, calib, 3, 4, method="aciq-mix", bias_correction=False, var_correction=False)
    unbiased = lowbit.quantize(fp, calib, 3, 4, method="aciq-mix", bias_correction=False)
    corrected = lowbit.quantize(fp, calib, 3, 4, method="aciq-mix")
    worst_before = 0.0
    for name, layer in quant_layers(corrected):
        x = _layer_inputs(plain, calib, name)  # the FP network's inputs of this layer
        ref = _channel_means(dict(quant_layers(plain))[name], x, weights_quantized=False)
        got = _channel_means(layer, x, weights_quantized=True)
        before = _channel_means(dict(quant_layers(unbiased))[name], x, weights_quantized=True)
        scale = ref.abs().max().clamp_min(1e-6)
        assert ((got - ref).abs() / scale).max() < 1e-4, name
        worst_before = max(worst_before, ((before - ref).abs() / scale).max().item())
    assert worst_before > 1e-3  # without the correction the means do move


def test_variance_correction_restores_each_channels_spread() -> None:
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((6, 512)) * torch.linspace(0.1, 2, 6)[:, None]
    wq = WeightQuantizer(3, 6, "channel")
    calibrate_mixed_weights(wq, w, AciqMixOptions())
    fp = w.clone()
    codes = wq.quantize(w).int_value
    before = wq(w).std(1)
    correct_variance(wq, w)  # w becomes the corrected values, on the new grid
    assert torch.equal(wq.quantize(w).int_value, codes)  # the codes stay
    assert torch.equal(wq(w), w)
    assert torch.allclose(w.std(1), fp.std(1), rtol=1e-4)
    assert not torch.allclose(before, fp.std(1), rtol=1e-2)


def test_mean_inputs_are_the_calibration_means() -> None:
    fp, calib = make_model("resnet20"), calib_tensor(16)
    q = lowbit.quantize(fp, calib, 4, 4, method="aciq-mix", bias_correction=False)
    names = [n for n, _ in quant_layers(q)]
    means = mean_inputs(q, calib, QuantConfig(batch_size=5), names)  # batches of 5: 16 is not a multiple
    assert set(means) == set(names)
    for name in names:
        assert torch.allclose(means[name].float(), _layer_inputs(q, calib, name).mean(0), atol=1e-5)


def test_export_round_trip_and_onnx_parity(tmp_path) -> None:
    fp, calib, images = make_model("resnet20"), calib_tensor(16), calib_tensor(64, seed=9)
    q = lowbit.quantize(fp, calib, 4, 4, method="aciq-mix")
    mixed = {n: l.weight_quant.group_bits for n, l in quant_layers(q)}
    assert any(len(set(b)) > 1 for b in mixed.values())  # some layer really mixes widths
    path = lowbit.export(q, tmp_path / "m.lowbit")
    back = lowbit.load(path, model=fp)
    with torch.no_grad():
        assert torch.equal(q(images), back(images))
    assert {n: l.weight_quant.group_bits for n, l in quant_layers(back)} == mixed
    for name, layer in quant_layers(back):  # codes are stored at the widest width of each layer
        assert layer.weight_quant.bits == max(mixed[name])
    s_q, s_back = lowbit.summary(q).totals, lowbit.summary(back).totals
    assert s_q == s_back
    body = [l for _, l in quant_layers(q) if l.role == "body"]
    body_avg = sum(l.weight_quant.mean_bits * l.weight.numel() for l in body) / sum(l.weight.numel() for l in body)
    assert body_avg == pytest.approx(4.0)  # the true average is the budget, not the storage width
    assert_matches_simulation(q, export_onnx(q, tmp_path / "m.onnx"), images)


def test_tampered_channel_widths_are_refused(tmp_path) -> None:
    fp, calib = make_model("resnet20"), calib_tensor(16)
    path = lowbit.export(lowbit.quantize(fp, calib, 4, 4, method="aciq-mix"), tmp_path / "m.lowbit")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(meta["manifest"])
    name = next(n for n, b in manifest["group_bits"].items() if min(b) < max(b))
    for bad in ([2] * len(manifest["group_bits"][name]), "x"):
        manifest["group_bits"][name] = bad
        save_file(tensors, str(tmp_path / "bad.lowbit"), metadata={**meta, "manifest": json.dumps(manifest)})
        with pytest.raises(LowbitError, match="group_bits"):
            lowbit.load(tmp_path / "bad.lowbit", model=fp)
    # widths that fit the row but not the stored codes: the widest channel claimed at the narrowest
    # width, so each width's run of codes no longer holds its channels (a swap of two widths keeps
    # every run's length and cannot be told from the file: version 5 packs each width's codes apart)
    widths = list(json.loads(meta["manifest"])["group_bits"][name])
    widths[widths.index(max(widths))] = min(widths)
    manifest["group_bits"][name] = "".join(widths)
    save_file(tensors, str(tmp_path / "bad.lowbit"), metadata={**meta, "manifest": json.dumps(manifest)})
    with pytest.raises(LowbitError, match=name):
        lowbit.load(tmp_path / "bad.lowbit", model=fp)


def test_options_are_checked() -> None:
    fp, calib = make_model("resnet20"), calib_tensor(8)
    with pytest.raises(LowbitError, match="min_bits"):
        lowbit.quantize(fp, calib, 4, 4, method="aciq-mix", min_bits=6, max_bits=4)
    with pytest.raises(LowbitError):
        lowbit.quantize(fp, calib, 4, 4, method="aciq-mix", alloc_range="max")
    with pytest.raises(LowbitError):
        lowbit.quantize(fp, calib, 4, 4, method="aciq-mix", bias_correction="yes")
