"""Layer kinds beyond Conv2d / Linear in the simulation: Conv1d and ConvTranspose2d quantized,
subclasses keeping their forward, other kinds left in float with a warning and counted as float."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantConfig
from lowbit.deploy.size import fp32_bytes, quantized_bytes, size_report
from lowbit.graph.fold import fold_batchnorm
from lowbit.graph.surgery import wrap_layers
from lowbit.quant.layers import quant_layers
from lowbit.quant.quantizer import WeightQuantizer
from tests.conftest import calib_tensor, randomize_bn, rel_err
from tests.layer_kind_models import (AddOne, Decoder, DecoderClassifier, FloatKindsNet, Flip, HalfLinear, Net1d,
                                     PlainTwin, Renamed, SubclassNet, images, make, signals)

METHODS = {
    "minmax": {}, "mse": {"candidates": 20}, "aciq": {}, "bitsplit": {"iters": 1, "samples": 2048},
    "brecq": {"iters": 4}, "qdrop": {"iters": 4}, "distill": {"block_iters": 2, "joint_iters": 2, "scale_lr": 1e-6},
}


def _quantize(model: nn.Module, x: torch.Tensor, method: str, **kwargs) -> nn.Module:
    return lowbit.quantize(model, x, method=method, **{**METHODS[method], **kwargs})


def _kinds(q: nn.Module) -> dict[str, str]:
    return {n: type(l).__name__ for n, l in quant_layers(q)}


# ------------------------------------------------------------------------------ the quantizer axis
def test_weight_quantizer_channel_axis_1_scales_output_channels_of_convtranspose() -> None:
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))  # ConvTranspose2d(6, 4, 3)
    w[:, 2] *= 50  # one output channel with a much wider range
    wq = WeightQuantizer(4, 4, "channel", axis=1)
    wq.calibrate(w, lowbit.quant.minmax_range)
    assert wq.scale.shape == (4,)
    for j in range(4):  # each output channel has its own max |w| / 7
        assert torch.isclose(wq.scale[j], w[:, j].abs().max() / 7)
    s, _ = wq.channel_params(4)
    assert s.shape == (1, 4, 1, 1)
    reference = torch.stack([torch.clamp(torch.round(w[:, j] / wq.scale[j]), -7, 7) * wq.scale[j]
                             for j in range(4)], 1)
    assert torch.equal(wq(w), reference)
    assert torch.equal(wq.dequantize(wq.quantize(w).int_value.float()), reference)
    # groups of consecutive output channels along the axis
    g = WeightQuantizer(4, 4, "group", groups=2, axis=1)
    g.calibrate(w, lowbit.quant.minmax_range)
    assert torch.allclose(g.scale, torch.stack([w[:, :2].abs().max(), w[:, 2:].abs().max()]) / 7)


def test_weight_quantizer_axis_0_unchanged() -> None:
    w = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    wq = WeightQuantizer(3, 5, "channel")
    wq.calibrate(w, lowbit.quant.minmax_range)
    assert torch.allclose(wq.scale, w.flatten(1).abs().amax(1) / 3)
    assert wq.channel_params(4)[0].shape == (5, 1, 1, 1)
    assert torch.equal(wq.grouped(w), w.reshape(5, -1))


# ------------------------------------------------------------------------------ wrapping and folding
def test_conv1d_and_convtranspose2d_are_wrapped_with_output_channel_axis() -> None:
    model = nn.Sequential(nn.Conv1d(2, 6, 3), nn.ConvTranspose2d(6, 4, 3, groups=2), nn.Linear(3, 2))
    wrap_layers(model, QuantConfig())
    conv1d, deconv, linear = model
    assert (type(conv1d).__name__, type(deconv).__name__) == ("QuantConv1d", "QuantConvTranspose2d")
    assert (conv1d.weight_quant.axis, conv1d.weight_quant.channels) == (0, 6)
    # (in, out / groups, kH, kW): per-axis scales along dim 1, shared by the conv groups (as in ONNX)
    assert (deconv.weight_quant.axis, deconv.weight_quant.channels) == (1, 2)
    assert (linear.weight_quant.axis, linear.weight_quant.channels) == (0, 2)


@pytest.mark.parametrize("cls, x", [(Net1d, signals(4)), (Decoder, images(4))], ids=["conv1d", "deconv"])
def test_batchnorm_folds_into_conv1d_and_convtranspose2d(cls, x) -> None:
    model = make(cls)
    folded = copy.deepcopy(model)
    pairs = fold_batchnorm(folded)
    expected = {Net1d: [("c1", "b1"), ("c2", "b2")],
                Decoder: [("enc", "eb"), ("up1", "ub1"), ("up2", "ub2")]}[cls]  # up2 is grouped
    assert pairs == expected
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5


# ------------------------------------------------------------------------------ every PTQ method
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_quantizes_conv1d_net(method) -> None:
    model, x = make(Net1d), signals()
    q = _quantize(model, x, method, w_bits=8, a_bits=8)
    assert _kinds(q) == {"c1": "QuantConv1d", "c2": "QuantConv1d", "c3": "QuantConv1d", "fc": "QuantLinear"}
    assert all(l.weight_quant.enabled for _, l in quant_layers(q))
    assert q.lowbit_info["fold_pairs"] == [["c1", "b1"], ["c2", "b2"]]
    with torch.no_grad():
        assert rel_err(q(x), model(x)) < 0.08


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_quantizes_convtranspose2d_decoder(method) -> None:
    model, x = make(Decoder), images()
    q = _quantize(model, x, method, w_bits=8, a_bits=8)
    kinds = _kinds(q)
    assert [kinds[n] for n in ("up1", "up2", "up3")] == ["QuantConvTranspose2d"] * 3
    assert all(l.weight_quant.enabled and l.role != "unused" for _, l in quant_layers(q))
    assert ["up2", "ub2"] in q.lowbit_info["fold_pairs"]
    with torch.no_grad():
        assert rel_err(q(x), model(x)) < 0.08


@pytest.mark.parametrize("cls, x", [(Net1d, signals()), (Decoder, images())], ids=["conv1d", "deconv"])
def test_bitsplit_fits_layer_outputs_better_than_minmax(cls, x) -> None:
    """At W4A8 the error-compensated Bit-Split fit must not be worse than min/max scales: its
    patches (1-D and transposed) have to match what the layers compute for that to hold."""
    model = make(cls)
    errs = {}
    for method in ("minmax", "bitsplit"):
        q = _quantize(model, x, method, w_bits=4, a_bits=8)
        assert {"QuantConv1d", "QuantConvTranspose2d"} & set(_kinds(q).values())
        with torch.no_grad():
            errs[method] = (q(x) - model(x)).pow(2).mean().item()
    assert errs["bitsplit"] < errs["minmax"]


LAYERS = [
    nn.Conv1d(4, 6, 4, padding="same", groups=2, dilation=2), nn.Conv1d(4, 6, 3, stride=2, padding=3),
    nn.Conv2d(4, 6, (2, 3), padding="same"), nn.Conv2d(4, 6, 3, stride=2, padding=(1, 2), dilation=(2, 1), groups=2),
    nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
    nn.ConvTranspose2d(4, 6, (3, 2), stride=(3, 2), padding=(3, 1), dilation=(1, 2), output_padding=(2, 1)),
    nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1, groups=4), nn.Linear(7, 3),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: repr(l)[:60])
def test_bitsplit_patches_times_weight_rows_are_the_layer_output(layer) -> None:
    """The Bit-Split fit min ||X W^T - Y|| holds only if its patch rows times its weight rows are
    the layer's output: checked against torch's own conv / conv_transpose (independent code)."""
    from lowbit.ptq.bitsplit import output_positions, patch_rows, rows_to_weight, weight_rows

    torch.manual_seed(0)
    model = nn.Sequential(copy.deepcopy(layer)).double()
    wrap_layers(model, QuantConfig())
    q = model[0]
    q.weight_quant.enabled = q.input_quant.enabled = False
    kind = type(layer).__name__
    x = torch.randn(5, 7).double() if kind == "Linear" else \
        torch.randn(3, 4, 9).double() if kind == "Conv1d" else torch.randn(3, 4, 7, 6).double()
    with torch.no_grad():
        y = q(x) - (q.bias.view((1, -1) + (1,) * (x.dim() - 2)) if q.bias is not None else 0)
        rows = patch_rows(q, x, None)
        w = weight_rows(q, q.weight)
        out = torch.bmm(rows, w.transpose(1, 2))  # K x (N P) x C
    assert torch.equal(rows_to_weight(q, w), q.weight)
    if kind == "Linear":
        assert torch.allclose(out[0], y, atol=1e-12)
        return
    k, n = out.shape[0], x.shape[0]
    got = out.reshape(k, n, -1, out.shape[-1]).permute(1, 0, 3, 2).reshape(n, y.shape[1], -1)
    assert got.shape[-1] == output_positions(q, x[:1])
    assert torch.allclose(got, y.reshape(n, y.shape[1], -1), atol=1e-12)


# ------------------------------------------------------------------------------ QAT
@pytest.mark.parametrize("method", ["lsq", "gdrq"])
@pytest.mark.parametrize("cls, x", [(Net1d, signals(32)), (DecoderClassifier, images(32))], ids=["conv1d", "deconv"])
def test_qat_runs_on_conv1d_and_convtranspose2d(method, cls, x) -> None:
    model = make(cls)
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(0))
    q = lowbit.qat(model, (x, y), method=method, w_bits=4, a_bits=4, epochs=1, batch_size=16, log=lambda *a: None)
    kinds = set(_kinds(q).values())
    assert ("QuantConv1d" if cls is Net1d else "QuantConvTranspose2d") in kinds
    pairs = q.lowbit_info["fold_pairs"]
    # BN merged into per-channel steps, except after the grouped ConvTranspose2d (shared per-axis scales)
    assert pairs == ([["c1", "b1"], ["c2", "b2"]] if cls is Net1d
                     else [["decoder.enc", "decoder.eb"], ["decoder.up1", "decoder.ub1"]])
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_qat_bn_merge_into_convtranspose2d_steps_is_exact() -> None:
    """BN folded into a ConvTranspose2d's per-channel steps (along dim 1) keeps the function."""
    from lowbit.graph.surgery import prepare
    from lowbit.qat.bn import align_bn_signs, fold_steps_into_bn

    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(5))
    net = randomize_bn(net, seed=1).eval()
    net[1].weight.data[1] = -net[1].weight.data[1].abs()  # a negative multiplier
    cfg = QuantConfig(w_bits=4, a_bits=None, fold_bn=False)
    q, _ = prepare(net, cfg, images(2, 3, 6))
    pairs = [("0", "1")]
    align_bn_signs(q, pairs)
    q[0].weight_quant.calibrate(q[0].weight, lowbit.quant.minmax_range)
    x = images(4, 3, 6)
    with torch.no_grad():
        before = q(x)
        fold_steps_into_bn(q, pairs, cfg)
        after = q(x)
    assert isinstance(q[1], nn.Identity) and q[0].weight_quant.axis == 1
    assert rel_err(after, before) < 1e-5


# ------------------------------------------------------------------------------ subclasses
def test_subclasses_keep_their_forward_when_quantized() -> None:
    model, x = make(SubclassNet), images()
    plain = PlainTwin(model).eval()
    with torch.no_grad():
        assert rel_err(plain(x), model(x)) > 0.2  # the subclasses' behaviour matters
    for method in ("minmax", "bitsplit", "brecq"):
        q = _quantize(model, x, method, w_bits=8, a_bits=8)
        kinds = _kinds(q)
        assert kinds["c"] == "QuantConv2d"  # a rename is quantized as before
        assert all(isinstance(getattr(q, n), cls) for n, cls in (("a", AddOne), ("b", Flip), ("fc", HalfLinear)))
        assert all(l.weight_quant.enabled and l.input_quant.enabled or l.role == "first"
                   for _, l in quant_layers(q))
        with torch.no_grad():
            assert rel_err(q(x), model(x)) < 0.03, method
    # a rename folds with its BN like Conv2d; layers with their own forward never fold
    assert q.lowbit_info["fold_pairs"] == [["c", "bc"]]


def test_subclass_forward_sees_the_quantized_weight_and_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), Flip(4, 4, 3)).eval()
    q = lowbit.quantize(model, images(8), w_bits=2, a_bits=2, quantize_all=True)
    layer = q[1]
    x = torch.relu(q[0](images(2)))
    with torch.no_grad():
        expected = nn.functional.conv2d(layer.input_quant(x), layer.weight_quant(layer.weight).flip(-1, -2), layer.bias)
        assert torch.equal(layer(x), expected)
        assert isinstance(layer.weight, nn.Parameter)  # the parameter is back after the call
    q[1].weight_quant.enabled = False
    with torch.no_grad():
        assert not torch.equal(layer(x), expected)
    # gradients reach the latent weight through the quantized one
    q[1].weight_quant.enabled = True
    q.zero_grad()
    q(images(2)).sum().backward()
    assert q[1].weight.grad is not None and q[1].weight.grad.abs().sum() > 0


def test_renamed_subclass_is_quantized_like_its_class() -> None:
    """Quantized, BN-folded and equalized exactly like the class it renames."""
    torch.manual_seed(0)
    model = nn.Sequential(Renamed(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), Renamed(4, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    model = randomize_bn(model, seed=1).eval()
    twin = copy.deepcopy(model)
    twin[0].__class__ = twin[3].__class__ = nn.Conv2d
    for options in ({}, {"equalize": True}):
        q, qt = (lowbit.quantize(m, images(8), w_bits=4, a_bits=4, **options) for m in (model, twin))
        assert type(q[0]).__name__ == type(q[3]).__name__ == "QuantConv2d"
        assert q.lowbit_info["fold_pairs"] == qt.lowbit_info["fold_pairs"] == [["0", "1"]]
        assert q.lowbit_info["equalized_pairs"] == qt.lowbit_info["equalized_pairs"]
        with torch.no_grad():
            assert torch.equal(q(images(4)), qt(images(4)))


# ------------------------------------------------------------------------------ kinds left in float
def test_unhandled_kinds_warn_once_naming_them_and_count_as_float() -> None:
    model, x = make(FloatKindsNet), images(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = lowbit.quantize(model, x, w_bits=4, a_bits=4)
    ours = [w for w in caught if str(w.message).startswith("lowbit:")]
    assert len(ours) == 1 and issubclass(ours[0].category, UserWarning)
    message = str(ours[0].message)
    assert "v (Conv3d)" in message and "t1 (ConvTranspose1d)" in message
    assert "c (" not in message and "fc (" not in message
    assert isinstance(q.v, nn.Conv3d) and isinstance(q.t1, nn.ConvTranspose1d)  # untouched
    report = size_report(model, q)
    assert report["float_layers"] == ["v", "t1"]
    assert report["float_weights"] == q.v.weight.numel() + q.t1.weight.numel()
    assert report["quantized_weights"] == q.c.weight.numel() + q.fc.weight.numel()
    # bytes: the float layers' weights and biases at 32 bit, exactly
    only_quantized = copy.deepcopy(q)
    only_quantized.v, only_quantized.t1 = nn.Identity(), nn.Identity()
    float_bytes = 4 * sum(p.numel() for m in (q.v, q.t1) for p in m.parameters())
    assert quantized_bytes(q) == quantized_bytes(only_quantized) + float_bytes
    assert fp32_bytes(model) / quantized_bytes(q) == pytest.approx(report["compression"])


def test_no_warning_when_every_weight_layer_is_quantized() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.quantize(make(Net1d), signals(8), w_bits=4, a_bits=4)
        lowbit.quantize(make(Decoder), images(8), w_bits=4, a_bits=4)


def test_conv1d_models_take_three_dimensional_calibration_data() -> None:
    q = lowbit.quantize(make(Net1d), [(signals(4), torch.zeros(4)), signals(4)[0]], w_bits=4, a_bits=4)
    assert q.lowbit_info["input_shape"] == [2, 32]
    with pytest.raises(lowbit.LowbitError, match="4-D"):  # image models keep asking for images
        lowbit.quantize(make(Decoder), calib_tensor(4)[:, 0])
