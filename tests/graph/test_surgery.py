"""quantize() rewrites any CNN: every conv/linear wrapped, roles of first/last layers, per-channel scales."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.quant import QuantConv2d, QuantLinear
from lowbit.quant.layers import quant_layers
from tests.conftest import calib_tensor, make_model


def _float_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_every_layer_is_wrapped(any_model):
    q = lowbit.quantize(any_model, calib_tensor(16))
    fp_layers = _float_layers(any_model)
    ql = dict(quant_layers(q))
    assert set(ql) == set(fp_layers)
    for name, fp in fp_layers.items():
        layer = ql[name]
        expected = QuantConv2d if isinstance(fp, nn.Conv2d) else QuantLinear
        assert type(layer) is expected
        assert layer.weight.shape == fp.weight.shape
        if isinstance(fp, nn.Conv2d):
            assert (layer.groups, layer.stride, layer.padding) == (fp.groups, fp.stride, fp.padding)
    # no plain float conv/linear is left behind, BN is folded away
    assert not [n for n, m in q.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert len(q.lowbit_info["layer_order"]) == len(fp_layers)
    assert not q.training


def test_default_roles_first_last_8bit(any_model):
    q = lowbit.quantize(any_model, calib_tensor(16), w_bits=4, a_bits=4)
    order = q.lowbit_info["layer_order"]
    layers = dict(quant_layers(q))
    first, last = layers[order[0]], layers[order[-1]]
    assert first.role == "first" and last.role == "last"
    assert isinstance(last, QuantLinear)
    assert not first.input_quant.enabled            # the network input stays FP
    assert first.weight_quant.bits == 8 and last.weight_quant.bits == 8
    assert last.input_quant.enabled and last.input_quant.bits == 8
    for name in order[1:-1]:
        layer = layers[name]
        assert layer.role == "body"
        assert layer.weight_quant.enabled and layer.weight_quant.bits == 4
        assert layer.input_quant.enabled and layer.input_quant.bits == 4
        assert layer.input_quant.scale.item() != 1.0  # calibrated
    # the FP input really passes unquantized: a first-layer input quantizer would round it
    x = calib_tensor(2)
    assert torch.equal(first.input_quant(x), x)


def test_quantize_all_makes_everything_low_bit(any_model):
    q = lowbit.quantize(any_model, calib_tensor(16), w_bits=4, a_bits=4, quantize_all=True)
    for name, layer in quant_layers(q):
        assert layer.weight_quant.enabled and layer.weight_quant.bits == 4, name
        assert layer.input_quant.enabled and layer.input_quant.bits == 4, name
    first = dict(quant_layers(q))[q.lowbit_info["layer_order"][0]]
    x = calib_tensor(2)
    y = first.input_quant(x)
    assert not torch.equal(y, x)
    assert len(y.unique()) <= 16
    assert q.lowbit_info["config"]["quantize_input"] is True
    assert q.lowbit_info["config"]["first_last_bits"] is None


@pytest.mark.parametrize("name", ["mobilenetv2", "shufflenetv2", "zoofree"])
def test_depthwise_and_grouped_convs_keep_per_channel_scales(name):
    q = lowbit.quantize(make_model(name), calib_tensor(16), w_bits=4, a_bits=4)
    special = [(n, l) for n, l in quant_layers(q) if isinstance(l, QuantConv2d) and l.groups > 1]
    assert special
    for name, layer in special:
        wq = layer.weight_quant
        assert wq.num_groups == layer.out_channels == wq.scale.numel(), name
        w = layer.weight.detach()
        assert torch.allclose(wq.scale, w.abs().flatten(1).amax(1) / 7, rtol=1e-5), name
        assert len(wq.scale.unique()) > 1


def test_zoofree_grouped_and_depthwise(zoofree):
    q = lowbit.quantize(zoofree, calib_tensor(16))
    assert q.grouped.groups == 2 and q.depthwise.groups == 8
    assert q.grouped.weight_quant.scale.shape == (8,)
    assert q.depthwise.weight_quant.scale.shape == (8,)
    assert [p for p in q.lowbit_info["fold_pairs"]] == [
        ["stem", "stem_bn"], ["grouped", "grouped_bn"], ["depthwise", "depthwise_bn"],
        ["halfconv", "halfconv_bn"], ["left", "left_bn"], ["right", "right_bn"]]
    assert q.lowbit_info["layer_order"][0] == "stem" and q.lowbit_info["layer_order"][-1] == "head"


def test_w8a8_close_to_fp(any_model):
    x = calib_tensor(32)
    q = lowbit.quantize(any_model, x, w_bits=8, a_bits=8)
    xt = calib_tensor(8, seed=99)
    with torch.no_grad():
        ref = any_model(xt)
        assert _rel_norm(q(xt), ref) < 0.05
        # W4A4 is further away than W8A8 (the comparison above is not trivially true)
        q4 = lowbit.quantize(any_model, x, w_bits=4, a_bits=4, quantize_all=True)
        assert _rel_norm(q4(xt), ref) > _rel_norm(q(xt), ref)


def test_granularity_applies_to_every_enabled_layer(resnet20):
    for gran, kw, check in [("tensor", {}, lambda l: 1),
                            ("group", {"groups": 3}, lambda l: next(g for g in (3, 2, 1) if l.weight.shape[0] % g == 0)),
                            ("channel", {}, lambda l: l.weight.shape[0])]:
        q = lowbit.quantize(resnet20, calib_tensor(8), granularity=gran, **kw)
        for name, layer in quant_layers(q):
            assert layer.weight_quant.num_groups == check(layer), (gran, name)


def test_untraceable_model_quantizes_unfolded(untraceable):
    x = calib_tensor(16)
    with pytest.warns(UserWarning, match="cannot be traced"):
        q = lowbit.quantize(untraceable, x, w_bits=8, a_bits=8)
    assert q.lowbit_info["fold_pairs"] == []
    assert isinstance(q.bn1, nn.BatchNorm2d) and isinstance(q.bn2, nn.BatchNorm2d)
    assert type(q.conv1) is QuantConv2d and type(q.conv2) is QuantConv2d and type(q.fc) is QuantLinear
    assert q.lowbit_info["layer_order"] == ["conv1", "conv2", "fc"]
    with torch.no_grad():
        assert _rel_norm(q(x), untraceable(x)) < 0.05


def test_fold_bn_false_keeps_batchnorm(resnet20):
    x = calib_tensor(16)
    q = lowbit.quantize(resnet20, x, w_bits=8, a_bits=8, fold_bn=False)
    assert q.lowbit_info["fold_pairs"] == []
    assert sum(isinstance(m, nn.BatchNorm2d) for m in q.modules()) == 21
    with torch.no_grad():
        assert _rel_norm(q(x), resnet20(x)) < 0.05


def test_weights_only_quantization(resnet20):
    q = lowbit.quantize(resnet20, calib_tensor(8), w_bits=4, a_bits=None)
    assert all(not l.input_quant.enabled for _, l in quant_layers(q))
    assert all(l.weight_quant.enabled for _, l in quant_layers(q))


def test_layer_never_called_stays_float(calib):
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.spare = nn.Conv2d(4, 4, 1)  # defined but never used in forward
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = WithSpare().eval()
    q = lowbit.quantize(model, calib)
    assert q.spare.role == "unused"
    assert not q.spare.weight_quant.enabled and not q.spare.input_quant.enabled
    assert q.lowbit_info["layer_order"] == ["conv", "fc"]


def test_batchnorm_without_running_stats_is_left_unfolded(calib):
    class NoStats(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4, track_running_stats=False)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).mean((2, 3)))

    q = lowbit.quantize(NoStats().eval(), calib, w_bits=8, a_bits=8)
    assert isinstance(q.bn, nn.BatchNorm2d)
