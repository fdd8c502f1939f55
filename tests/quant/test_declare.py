"""Declared specs: prepare builds every layer's quantizers once from the spec it declares (quant.declare)."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.graph.surgery import prepare
from lowbit.layer_bits import LayerBits
from lowbit.quant import spec as qspec
from lowbit.quant.declare import declare_layer
from lowbit.quant.layer_specs import input_quantizer, layer_specs, weight_quantizer
from lowbit.quant.layers import quant_layers
from lowbit.quant.quantizer import ActQuantizer, WeightQuantizer
from lowbit.quant.ranges import minmax_range
from lowbit.quant.sparse import SparseActQuantizer
from lowbit.quant.spec import TensorSpec

from ..conftest import calib_tensor, make_model


def _code_book(spec: TensorSpec | None):
    return None if spec is None else spec.to_record()[0]


def _check_built_from_declaration(qmodel) -> dict:
    """Every quantized layer's quantizers implement its declared spec, field for field; returns the declaration."""
    declared = lowbit.record_of(qmodel).declared
    built = {s.name: s for s in layer_specs(qmodel)}
    assert list(declared) == list(built) == [n for n, _ in quant_layers(qmodel)]
    for name, want in declared.items():
        got = built[name]
        assert (want.kind, want.role, want.weight_shape, want.out_channels) == \
               (got.kind, got.role, got.weight_shape, got.out_channels), name
        for part in ("weight", "input"):
            assert _code_book(getattr(want, part)) == _code_book(getattr(got, part)), (name, part)
            assert getattr(want, part) is None or not getattr(want, part).calibrated
    return declared


def test_prepare_builds_each_layer_from_its_declared_spec() -> None:
    fp = make_model("resnet20")
    x = calib_tensor(2)
    names = [n for n, m in fp.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    pruned = names[3]
    channels = dict(fp.named_modules())[pruned].weight.shape[0]
    widths = [(0, 1, 3, 4)[i % 4] for i in range(channels)]
    layer_bits = {names[1]: 8, names[2]: (3, 6), names[4]: None, pruned: widths, "fc": (2, None)}
    cfg = QuantConfig(w_bits=4, a_bits=4, granularity="group", groups=2, w_narrow=False)
    qmodel, _ = prepare(fp, cfg, x, layer_bits=layer_bits)
    declared = _check_built_from_declaration(qmodel)
    layers = dict(quant_layers(qmodel))
    # the protocol's defaults and the map's entries, declared
    first = declared[names[0]]
    assert (first.role, first.weight.bits, first.input) == ("first", 8, None)
    assert (declared[names[1]].weight.bits, declared[names[1]].input.bits) == (8, 4)
    assert (declared[names[2]].weight.bits, declared[names[2]].input.bits) == (3, 6)
    assert (declared["fc"].weight.bits, declared["fc"].input) == (2, None)
    assert declared[names[5]].weight.num_groups == 2  # the config's groups
    # per-channel widths: per-channel scales whatever the granularity, storage width 4, pruned and binary channels
    per_channel = declared[pruned].weight
    assert (per_channel.granularity, per_channel.num_groups, per_channel.group_bits, per_channel.bits) == \
           ("channel", channels, tuple(widths), 4)
    assert layers[pruned].weight_quant.group_bits == tuple(widths)
    # a float layer: no spec, its quantizers are the config's uniform ones, switched off
    assert declared[names[4]].weight is None and declared[names[4]].input is None
    wq, aq = layers[names[4]].weight_quant, layers[names[4]].input_quant
    assert isinstance(wq, WeightQuantizer) and not wq.enabled and (wq.bits, wq.num_groups) == (4, 2)
    assert isinstance(aq, ActQuantizer) and not aq.enabled and aq.bits == 4
    # calibration fills the parameters in: the code book stays the declared one
    q = lowbit.quantize(fp, calib_tensor(8), method="minmax", w_bits=4, a_bits=4, granularity="group", groups=2,
                        w_narrow=False, layer_bits=layer_bits, progress=False)
    for spec in layer_specs(q):
        want = declared[spec.name]
        assert _code_book(spec.weight) == _code_book(want.weight), spec.name
        assert spec.weight is None or spec.weight.calibrated


def test_quantize_all_declares_every_input_and_width() -> None:
    fp = make_model("mobilenetv2")
    cfg = QuantConfig(w_bits=3, a_bits=5, first_last_bits=None, quantize_input=True, granularity="tensor")
    qmodel, _ = prepare(fp, cfg, calib_tensor(2))
    declared = _check_built_from_declaration(qmodel)
    assert {(s.weight.bits, s.weight.num_groups, s.input.bits) for s in declared.values()} == {(3, 1, 5)}


def test_weight_only_config_keeps_a_widthless_input_quantizer() -> None:
    fp = make_model("resnet20")
    qmodel, _ = prepare(fp, QuantConfig(w_bits=4, a_bits=None), calib_tensor(2), layer_bits={"fc": (4, 8)})
    declared = _check_built_from_declaration(qmodel)
    layers = dict(quant_layers(qmodel))
    assert declared["fc"].input.bits == 8 and layers["fc"].input_quant.enabled
    other = layers["conv1"].input_quant
    assert declared["conv1"].input is None and not other.enabled and other.bits is None


def test_factories_build_fresh_quantizers_from_declared_specs() -> None:
    spec = TensorSpec("uniform", 4, True, True, True, "channel", 6, 6, 0, (4, 1, 0, 2, 4, 3))
    assert not spec.calibrated
    wq = weight_quantizer(spec)
    assert torch.equal(wq.scale, torch.ones(6)) and torch.equal(wq.zero_point, torch.zeros(6))
    wq.calibrate(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), minmax_range)
    done = wq.spec()
    assert done.calibrated and done.to_record()[0] == spec.to_record()[0]
    assert weight_quantizer(done).spec() == done  # a calibrated spec gives the committed quantizer
    aq = input_quantizer(TensorSpec("sparse", 3, False), symmetric=False)
    assert isinstance(aq, SparseActQuantizer) and aq.bits == 3 and float(aq.threshold) == 0.0
    act = input_quantizer(TensorSpec("uniform", 5, False, False), symmetric=True)
    assert isinstance(act, ActQuantizer) and act.symmetric and not act.signed and act.enabled


@pytest.mark.parametrize("kind, shape, bits, message", [
    ("conv3d", (4, 2, 3, 3, 3), LayerBits(4, 4), "not one lowbit quantizes"),
    ("conv2d", (4, 2, 3), LayerBits(4, 4), "has 4 dimensions"),
    ("conv2d", (4, 2, 3, 3), LayerBits(4, 4, (4, 2, 1)), "give 3 channels"),
    ("convtranspose2d", (4, 2, 3, 3), LayerBits(4, 4, (4, 4, 4, 4)), "has 2 along axis 1"),
    ("linear", (3, 5), LayerBits(4, 4, (0, 0, 0)), "at least one unpruned"),
    ("linear", (3, 5), LayerBits(8, 4, (4, 2, 1)), "storage width"),
])
def test_bad_declarations_are_refused(kind, shape, bits, message) -> None:
    with pytest.raises(LowbitError, match=message):
        declare_layer("layer", kind, "body", shape, shape[0], QuantConfig(), bits)


def test_declared_specs_have_no_values_and_are_never_stored() -> None:
    declared = TensorSpec("uniform", 4, True, granularity="channel", channels=3, num_groups=3)
    with pytest.raises(LowbitError, match="only declared"):
        qspec.codes(declared, torch.zeros(3, 2))
    with pytest.raises(LowbitError, match="only declared"):
        qspec.dequantize(declared, torch.zeros(3, 2, dtype=torch.int32))
    meta, tensors = declared.to_record()
    assert tensors == {}
    with pytest.raises(LowbitError, match="must hold its parameters"):
        TensorSpec.from_record(meta, tensors)
    with pytest.raises(LowbitError, match="declared multibit"):
        weight_quantizer(TensorSpec("multibit", 2, True, granularity="channel", channels=3, num_groups=3))
    with pytest.raises(LowbitError, match="sparse tensor spec is per tensor"):
        TensorSpec("sparse", 4, True)
