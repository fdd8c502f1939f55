"""quant.spec: every code book kind round trips exactly, and the pure functions compute what the quantizers do."""
from __future__ import annotations

import json

import pytest
import torch

from lowbit import LowbitError
from lowbit.quant.dmbq_quantizers import DmbqAct, DmbqWeight
from lowbit.quant.layer_specs import input_quantizer, weight_quantizer
from lowbit.quant.quantizer import ActQuantizer, WeightQuantizer
from lowbit.quant.ranges import minmax_range
from lowbit.quant.sparse import SparseActQuantizer
from lowbit.quant.spec import (LayerSpec, TensorSpec, codes, dequantize, fake_quantize, nbytes, pruned_channels,
                               value_range)


def _weight(shape=(6, 3, 3, 3), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _uniform_weight(**kw) -> WeightQuantizer:
    wq = WeightQuantizer(kw.pop("bits", 4), 6, **kw)
    wq.calibrate(_weight(), minmax_range)
    return wq


def _mixed_widths() -> WeightQuantizer:
    wq = WeightQuantizer(4, 6, "channel")
    wq.set_group_bits([2, 3, 4, 4, 3, 2])
    wq.calibrate(_weight(), minmax_range)
    return wq


def _binary() -> WeightQuantizer:
    return _uniform_weight(bits=1)


def _transposed() -> WeightQuantizer:
    wq = WeightQuantizer(3, 3, "channel", axis=1)  # ConvTranspose weight (in, out, k, k)
    wq.calibrate(_weight((6, 3, 3, 3)), minmax_range)
    return wq


def _act(signed: bool = False) -> ActQuantizer:
    aq = ActQuantizer(4, symmetric=signed)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    aq.calibrate(x if signed else x.relu(), minmax_range)
    return aq


def _sparse() -> SparseActQuantizer:
    return SparseActQuantizer.from_quantizer(_act(), 0.3)


def _dmbq_weight() -> DmbqWeight:
    q = DmbqWeight(WeightQuantizer(1, 6, "channel"), 2)
    q.channel_bits.copy_(torch.tensor([0, 1, 2, 3, 4, 2]))
    q.update_alphas(q.rows(_weight()))
    q.frozen = True
    return q


def _dmbq_act(signed: bool = False) -> DmbqAct:
    q = DmbqAct(ActQuantizer(3), 3, signed)
    q.start(torch.randn(1000, generator=torch.Generator().manual_seed(2)).abs())
    return q.commit()


WEIGHTS = {"uniform": _uniform_weight, "asymmetric": lambda: _uniform_weight(symmetric=False),
           "group": lambda: _uniform_weight(granularity="group", groups=3), "tensor": lambda: _uniform_weight(granularity="tensor"),
           "mixed-widths": _mixed_widths, "binary": _binary, "transposed": _transposed, "multibit": _dmbq_weight}
INPUTS = {"unsigned": _act, "signed": lambda: _act(True), "sparse": _sparse, "multibit": _dmbq_act,
          "multibit-signed": lambda: _dmbq_act(True)}


def _round_trip(spec: TensorSpec) -> TensorSpec:
    meta, tensors = spec.to_record()
    meta = json.loads(json.dumps(meta))  # through JSON, as files carry it
    return TensorSpec.from_record(meta, {k: v.clone() for k, v in tensors.items()})


@pytest.mark.parametrize("case", sorted(WEIGHTS) + sorted(INPUTS))
def test_every_kind_round_trips_exactly(case) -> None:
    quantizer = (WEIGHTS.get(case) or INPUTS[case])()
    spec = quantizer.spec()
    back = _round_trip(spec)
    assert back == spec and back.to_record()[0] == spec.to_record()[0]
    assert all(torch.equal(a, back.to_record()[1][k]) for k, a in spec.to_record()[1].items())
    assert spec.kind == quantizer.CODE_BOOK
    layer = LayerSpec("conv", "conv2d", "body", (6, 3, 3, 3), 6, spec if case in WEIGHTS else None,
                      spec if case in INPUTS else None)
    meta, tensors = layer.to_record()
    assert LayerSpec.from_record(json.loads(json.dumps(meta)), tensors) == layer


@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_weight_codes_and_values_are_the_quantizers(case) -> None:
    wq = WEIGHTS[case]()
    spec = wq.spec()
    w = _weight((6, 3, 3, 3))
    if spec.kind == "multibit":  # a committed DMBQ layer holds its levels (the training STE adds ulp noise)
        with torch.no_grad():
            w = wq(w)
    q = codes(spec, w)
    with torch.no_grad():
        assert torch.equal(dequantize(spec, q), wq(w))  # the spec's values are the simulation's, bit for bit
    if spec.kind == "uniform":
        assert torch.equal(q, wq.quantize(w).int_value)
    lo, hi = value_range(spec)
    sim = wq(w).detach()
    rows = (sim.movedim(spec.axis, 0) if spec.axis else sim).reshape(spec.num_groups, -1)
    assert bool((rows >= lo[:, None] - 1e-6).all() and (rows <= hi[:, None] + 1e-6).all())
    rebuilt = weight_quantizer(spec)  # the simulation built from the spec computes the same
    with torch.no_grad():
        assert torch.equal(rebuilt(w), wq(w))


@pytest.mark.parametrize("case", sorted(INPUTS))
def test_input_values_are_the_quantizers(case) -> None:
    aq = INPUTS[case]()
    spec = aq.spec()
    x = torch.linspace(-3, 3, 2001)
    with torch.no_grad():
        assert torch.allclose(fake_quantize(spec, x), aq(x), atol=1e-6, rtol=0)
        assert torch.allclose(input_quantizer(spec)(x), aq(x), atol=1e-6, rtol=0)


def test_bytes_follow_widths() -> None:
    assert nbytes(_uniform_weight().spec(), 162) == (162 * 4 + 7) // 8 + 6 * 4
    assert nbytes(_uniform_weight(symmetric=False).spec(), 162) == (162 * 4 + 7) // 8 + 6 * 8
    # multibit: bits_c planes of 27 weights per channel plus bits_c alphas; the pruned channel costs nothing
    total = 0 + 1 + 2 + 3 + 4 + 2
    assert nbytes(_dmbq_weight().spec(), 162) == (27 * total + 7) // 8 + 4 * total


def test_pruned_channels_are_the_zero_width_groups() -> None:
    assert pruned_channels(_dmbq_weight().spec()) == 1  # widths 0, 1, 2, 3, 4, 2
    assert pruned_channels(_mixed_widths().spec()) == pruned_channels(_uniform_weight().spec()) == 0
    assert pruned_channels(_sparse().spec()) == 0
    # groups of two channels: a pruned group prunes both of its channels
    grouped = TensorSpec("multibit", 2, True, granularity="group", channels=6, num_groups=3, group_bits=(0, 2, 0),
                         alphas=torch.ones(3, 2))
    assert pruned_channels(grouped) == 4 and grouped.mean_bits == 2 / 3


@pytest.mark.parametrize("change, message", [
    ({"kind": "lattice"}, "kind must be one of"),
    ({"bits": 17}, "bits must be an integer 1..16"),
    ({"bits": True}, "bits must be an integer"),
    ({"signed": 1}, "signed must be true or false"),
    ({"num_groups": 4}, "num_groups must be a divisor"),
    ({"group_bits": [2, 3]}, "group_bits must be"),
    ({"granularity": "row"}, "granularity must be one of"),
])
def test_bad_records_are_refused(change, message) -> None:
    meta, tensors = _uniform_weight().spec().to_record()
    with pytest.raises(LowbitError, match=message):
        TensorSpec.from_record({**meta, **change}, tensors)


def test_bad_tensors_are_refused() -> None:
    meta, tensors = _uniform_weight().spec().to_record()
    for key, value, message in [("scale", torch.zeros(6), "scale must be > 0"),
                                ("scale", torch.ones(5), "scale must be a float32 tensor of shape"),
                                ("zero_point", torch.full((6,), 0.5), "zero_point must be integers"),
                                ("threshold", torch.zeros(1), "no threshold")]:
        with pytest.raises(LowbitError, match=message):
            TensorSpec.from_record(meta, {**tensors, key: value})
    meta, tensors = _dmbq_weight().spec().to_record()
    with pytest.raises(LowbitError, match="alphas must be"):
        TensorSpec.from_record(meta, {"alphas": tensors["alphas"][:, :2]})


def _pruned_binary(widths=(4, 1, 0, 2, 1, 0), signed: bool = True) -> WeightQuantizer:
    wq = WeightQuantizer(4, 6, "channel", symmetric=signed)
    wq.set_group_bits(list(widths))
    wq.calibrate(_weight(), minmax_range)
    return wq


@pytest.mark.parametrize("widths, signed, stored", [((4, 1, 0, 2, 1, 0), True, 4), ((1, 0, 1, 1, 0, 1), True, 2),
                                                     ((1, 1, 1, 1, 1, 1), True, 1), ((3, 1, 0, 2, 1, 0), False, 3)])
def test_group_bits_with_binary_and_pruned_channels(widths, signed, stored) -> None:
    wq = _pruned_binary(widths, signed)
    w = _weight()
    out = wq(w)
    spec = wq.spec()
    assert wq.bits == spec.bits == stored and spec.group_bits == widths
    for c, b in enumerate(widths):
        if b == 0:  # pruned: exactly zero, zero point 0
            assert torch.equal(out[c], torch.zeros_like(out[c])) and spec.zero_point[c] == 0
        elif b == 1 and signed:  # binary: the sign of every weight times the channel's scale (mean |w|)
            assert torch.equal(out[c], torch.where(w[c] >= 0, 1.0, -1.0) * wq.scale[c])
            assert torch.allclose(wq.scale[c], w[c].abs().mean())
        else:
            assert len(out[c].unique()) <= 2 ** b
    # the spec computes what the quantizer does, codes stay in each channel's range, and it round trips
    assert torch.equal(fake_quantize(spec, w), out)
    q = codes(spec, w)
    assert torch.equal(q, wq.quantize(w).int_value)
    assert all(q[c].abs().max() <= (0 if b == 0 else 1 if b == 1 else 2 ** b) for c, b in enumerate(widths))
    meta, tensors = spec.to_record()
    assert TensorSpec.from_record(json.loads(json.dumps(meta)), tensors) == spec
    assert torch.equal(weight_quantizer(spec)(w), out)
    lo, hi = value_range(spec)
    assert all(lo[c] == hi[c] == 0 for c, b in enumerate(widths) if b == 0)


@pytest.mark.parametrize("group_bits, zero, message", [
    ([4, 1, 0, 2, 1, 17], None, "group_bits must be"),
    ([0, 0, 0, 0, 0, 0], None, "at least one unpruned"),
    ([1, 0, 1, 1, 0, 1], None, "storage width"),  # stored at 2 bits, not 4
    ([4, 1, 0, 2, 1, 0], 1.0, "zero_point must be 0 for every pruned"),
])
def test_bad_pruned_group_bits_are_refused(group_bits, zero, message) -> None:
    meta, tensors = _pruned_binary(signed=False).spec().to_record()
    if zero is not None:
        tensors = {**tensors, "zero_point": torch.full((6,), zero)}
    with pytest.raises(LowbitError, match=message):
        TensorSpec.from_record({**meta, "group_bits": group_bits}, tensors)
    wq = WeightQuantizer(4, 6, "channel")
    with pytest.raises(LowbitError, match="group_bits"):
        wq.set_group_bits([0] * 6 if group_bits[0] == 0 else [4, 1, 0, 2, 1, 17])
