"""The quantized model's record (``lowbit.record_of``) and its read-only ``lowbit_info`` view."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, QuantRecord, record_of

from .conftest import calib_tensor, make_model


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 16 * 16, 3)).eval()


def test_quantize_fills_one_typed_record_and_the_view_follows_it() -> None:
    q = lowbit.quantize(_small(), calib_tensor(8), w_bits=4, a_bits=8, method="mse", candidates=5)
    rec = record_of(q)
    assert isinstance(rec, QuantRecord) and rec.method == "mse" and rec.config.w_bits == 4
    assert rec.layer_order == ["0", "4"] and rec.fold_pairs == [("0", "1")] and rec.input_shape == [1, 16, 16]
    assert rec.layer_bits["4"].w_bits == 8 and rec.options["candidates"] == 5  # last layer: 8 bits by default
    info = q.lowbit_info
    assert info["config"] == rec.config.to_dict() and info["fold_pairs"] == [["0", "1"]] and "qat" not in info
    with pytest.raises(TypeError):
        info["method"] = "other"  # a view: the record is written through record_of
    info["config"]["w_bits"] = 2  # a fresh copy: the record does not change
    assert rec.config.w_bits == 4 and q.lowbit_info["config"]["w_bits"] == 4
    rec.input_shape = [1, 20, 20]
    assert q.lowbit_info["input_shape"] == [1, 20, 20]


def test_the_record_survives_deepcopy_to_and_an_artifact(tmp_path) -> None:
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(8), w_bits=3, a_bits=4, method="minmax")
    twin = copy.deepcopy(q).to("cpu")
    assert record_of(twin) is not record_of(q) and record_of(twin) == record_of(q)
    assert twin.lowbit_info == q.lowbit_info
    record_of(twin).method = "changed"  # the copy's view reads the copy's record
    assert twin.lowbit_info["method"] == "changed" and q.lowbit_info["method"] == "minmax"
    loaded = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"))
    a, b = record_of(loaded), record_of(q)
    assert (a.method, a.arch, a.config, a.layer_order, a.layer_bits, a.fold_pairs, a.input_shape) == \
           (b.method, b.arch, b.config, b.layer_order, b.layer_bits, b.fold_pairs, b.input_shape)


def test_record_of_an_unquantized_model_is_a_lowbit_error() -> None:
    for bad in (make_model("resnet20"), nn.Linear(2, 2), "model"):
        with pytest.raises(LowbitError, match="no lowbit record"):
            record_of(bad)


def test_gdrq_keeps_its_results_in_the_record_not_on_modules() -> None:
    x, y = calib_tensor(16), torch.arange(16) % 10
    q = lowbit.qat(make_model("resnet20"), (x, y), method="gdrq", w_bits=4, a_bits=4, epochs=1, batch_size=8)
    rec = record_of(q)
    assert rec.qat["finished"] and rec.gdrq_k and rec.bn_pairs == [] and rec.fold_pairs
    assert q.lowbit_info["qat"] == rec.qat and q.lowbit_info["fold_pairs"] == [list(p) for p in rec.fold_pairs]
    # lowbit_arch: the zoo model's own constructor arguments, copied with the FP model
    assert not [k for k in vars(q) if k.startswith("lowbit_") and k not in ("lowbit_record", "lowbit_info", "lowbit_arch")]


def test_a_registered_method_keeps_its_results_in_the_record() -> None:
    from lowbit.ptq.registry import _METHODS, register_method

    @register_method("record-probe", description="minmax, then a note in the record")
    def probe(qmodel, calib, cfg, opts) -> None:
        _METHODS["minmax"].handler(qmodel, calib, cfg, None)
        record_of(qmodel).extra["record-probe"] = {"images": len(calib)}

    try:
        q = lowbit.quantize(_small(), calib_tensor(8), w_bits=4, a_bits=8, method="record-probe")
    finally:
        del _METHODS["record-probe"]
    assert record_of(q).extra == {"record-probe": {"images": 8}} and record_of(q).method == "record-probe"
