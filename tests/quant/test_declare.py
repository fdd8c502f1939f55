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


# ------------------------------------------------------------------------------ what QAT methods declare
from lowbit.quant import declare as qdeclare  # noqa: E402
from lowbit.quant.dmbq_quantizers import DmbqAct, DmbqWeight  # noqa: E402
from lowbit.quant.layer_specs import (register_trainer, trainers, training_input_quantizer,  # noqa: E402
                                      training_weight_quantizer)
from lowbit.quant.learnable import LearnedStepAct, LearnedStepWeight  # noqa: E402
from lowbit.quant.sparse import SparseStepAct  # noqa: E402

from ..conftest import self_labelled  # noqa: E402

_QAT = dict(epochs=1, batch_size=16, lr=0.01, progress=False, log=lambda s: None)


@pytest.mark.parametrize("model, method, kw, kinds", [
    ("resnet20", "lsq", dict(w_bits=3, a_bits=3), {"uniform"}),
    ("resnet20", "dmbq", dict(w_bits=2, a_bits=2), {"uniform", "multibit"}),
    ("resnet20", "tsq", dict(w_bits=2, a_bits=2, samples=128, iters=1), {"uniform", "sparse"}),
    ("resnet20", "gdrq", dict(w_bits=3, a_bits=3), {"uniform"}),
    # inputs that go negative take signed codes once calibrated: what setup declares for them
    ("zoofree", "lsq", dict(w_bits=3, a_bits=3, a_symmetric=True, quantize_all=True), {"uniform"}),
])
def test_qat_methods_declare_the_code_books_the_trained_model_holds(model, method, kw, kinds) -> None:
    fp, x, y = self_labelled(model, 32)
    q = lowbit.qat(fp, (x, y), method=method, **kw, **_QAT)
    declared = lowbit.record_of(q).declared
    if kw.get("a_symmetric"):
        assert {s.input.signed for s in declared.values()} == {True, False}
    held = {s.name: s for s in layer_specs(q)}
    assert list(declared) == list(held)
    seen = set()
    for name, want in declared.items():
        for part in ("weight", "input"):
            w, h = getattr(want, part), getattr(held[name], part)
            assert _code_book(w) == _code_book(h), (method, name, part)
            if w is not None:
                assert not w.calibrated and h.calibrated
                seen.add(w.kind)
    assert seen == kinds


def test_dmbq_with_lba_declares_its_start_widths() -> None:
    """LBA moves bases between channels while it trains: everything else stays as declared."""
    fp, x, y = self_labelled("resnet20", 32)
    q = lowbit.qat(fp, (x, y), method="dmbq", w_bits=1.5, a_bits=2, lba="channel", lba_every=1, **_QAT)
    declared = lowbit.record_of(q).declared
    for s in layer_specs(q):
        want = declared[s.name].weight
        if want is None or want.kind != "multibit":
            continue
        assert want.group_bits == (2,) * want.channels  # the budget's ceiling, before any move
        got, exp = _code_book(s.weight), _code_book(want)
        for key in ("bits", "group_bits"):
            got.pop(key), exp.pop(key)
        assert got == exp, s.name


def test_training_factory_builds_each_kind_from_its_declaration() -> None:
    cfg = QuantConfig(w_bits=3, a_bits=3)
    spec = declare_layer("conv", "conv2d", "body", (6, 2, 3, 3), 6, cfg, LayerBits(3, 3))
    base_w = weight_quantizer(spec.weight)
    weight = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    mixed = TensorSpec("multibit", 3, True, True, False, "channel", 6, 6, 0, (3, 0, 1, 2, 3, 3))
    dq = training_weight_quantizer(mixed, base_w, solver="table")
    assert isinstance(dq, DmbqWeight) and dq.channel_bits.tolist() == [3, 0, 1, 2, 3, 3] and dq.solver == "table"
    assert isinstance(training_weight_quantizer(spec.weight, base_w, weight=weight), LearnedStepWeight)
    lowbit.qat_methods()  # GDRQ registers its Scale-Clip trainer; LSQ stays the default of uniform code books
    assert trainers("weight", "uniform") == ["lsq", "scaleclip"] and trainers("input", "sparse") == ["tsq"]
    signed = qdeclare.multibit_input(spec.input, True)
    act = training_input_quantizer(signed, input_quantizer(spec.input), momentum=0.5)
    assert isinstance(act, DmbqAct) and act.signed and act.bits == 3 and act.momentum == 0.5
    sparse = qdeclare.sparse_input(spec.input)
    assert isinstance(training_input_quantizer(sparse, input_quantizer(sparse), sparsity=0.1), SparseStepAct)
    uniform = qdeclare.settled_input(spec.input, False)
    assert isinstance(training_input_quantizer(uniform, input_quantizer(spec.input)), LearnedStepAct)


def _uniform_weight(bits: int = 3, widths=None) -> TensorSpec:
    return TensorSpec("uniform", bits, True, True, True, "channel", 4, 4, 0, widths)


@pytest.mark.parametrize("make, message", [
    (lambda: qdeclare.multibit_weight(_uniform_weight(8)), "1 to 4 bases"),
    (lambda: qdeclare.multibit_weight(_uniform_weight(3, (3, 1, 0, 2))), "not from per-channel uniform widths"),
    (lambda: qdeclare.multibit_weight(None), "a float part has none"),
    (lambda: qdeclare.multibit_weight(TensorSpec("sparse", 3, False)), "declared uniform code book"),
    (lambda: qdeclare.multibit_weight(weight_quantizer(_uniform_weight()).spec()), "got a calibrated uniform"),
    (lambda: qdeclare.multibit_input(TensorSpec("uniform", 6, False, False), False), "1 to 4 bases"),
    (lambda: qdeclare.multibit_input(TensorSpec("uniform", 3, False, False), 1), "true or false"),
    (lambda: qdeclare.multibit_input(_uniform_weight(), True), "one code range for the tensor"),
    (lambda: qdeclare.sparse_input(TensorSpec("uniform", 3, True, True)), "sparse input is unsigned"),
    (lambda: qdeclare.settled_input(TensorSpec("multibit", 2, True), True), "declared uniform code book"),
])
def test_bad_training_declarations_are_refused(make, message) -> None:
    with pytest.raises(LowbitError, match=message):
        make()


def test_training_factory_refuses_what_does_not_fit() -> None:
    spec = _uniform_weight()
    base = weight_quantizer(spec)
    weight = torch.zeros(4, 2)
    with pytest.raises(LowbitError, match="differs from the layer's quantizer in \\['bits'\\]"):
        training_weight_quantizer(_uniform_weight(4), base, weight=weight)
    with pytest.raises(LowbitError, match="width, channels and axis \\(3, 5, 0\\)"):
        training_weight_quantizer(TensorSpec("multibit", 3, True, True, False, "channel", 5, 5, 0, (3,) * 5), base)
    with pytest.raises(LowbitError, match="width, channels and axis \\(2, 4, 0\\)"):
        training_weight_quantizer(TensorSpec("multibit", 2, True, True, False, "channel", 4, 4, 0, (2,) * 4), base)
    with pytest.raises(LowbitError, match="from a declared spec"):
        training_weight_quantizer(base.spec(), base, weight=weight)
    with pytest.raises(LowbitError, match="no trainer 'adaround' for uniform weight code books; known: lsq"):
        training_weight_quantizer(spec, base, trainer="adaround", weight=weight)
    with pytest.raises(LowbitError, match="no trainer for sparse weight"):
        training_weight_quantizer(TensorSpec("sparse", 3, False), base)
    base.enabled = False
    with pytest.raises(LowbitError, match="a disabled WeightQuantizer"):
        training_weight_quantizer(spec, base, weight=weight)
    with pytest.raises(LowbitError, match="enabled ActQuantizer, got WeightQuantizer"):
        training_input_quantizer(TensorSpec("uniform", 3, False, False), base)
    with pytest.raises(LowbitError, match="a part in"):
        register_trainer("bias", "uniform", "x")
