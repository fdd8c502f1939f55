"""Export of DMBQ models: packed sign planes + alphas in the artifact (version 4) round trip, pruned
channels free, damaged files refused, ``lowbit-multibit`` files of before still load, ONNX parity."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.deploy.artifact import CODE_BOOKS_KEY, FORMAT, PARAMS_KEY, PLANES_KEY, SPECS_KEY, VERSION, read_artifact
from lowbit.deploy.multibit import multibit_onnx_ops
from lowbit.deploy.onnx_qdq import onnx_session
from lowbit.deploy.size import quantized_bytes
from lowbit.errors import LowbitError
from lowbit.quant.dmbq_quantizers import DmbqAct, DmbqWeight
from lowbit.quant.layer_specs import layer_specs
from lowbit.quant.layers import quant_layers

from .. import layer_kind_models
from ..conftest import calib_tensor, make_model
from .test_artifact import data_bytes

# Written by ``lowbit.deploy.multibit.save_multibit`` at commit 031f68b (the writer of the format before
# artifact version 4): the test fixture below's model (QAT dmbq w_bits=1.5 a_bits=2 lba="channel", one
# epoch, channel 0 of the first DMBQ layer pruned), with its logits on ``images`` in the second file.
FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "dmbq_multibit_v1.lowbit"
LEGACY_EXPECTED = FIXTURES / "dmbq_multibit_v1_expected.safetensors"


@pytest.fixture(scope="module")
def trained():
    fp = make_model("resnet20", 0)
    x = calib_tensor(48, seed=5)
    with torch.no_grad():
        y = fp(x).argmax(1)
    q = lowbit.qat(fp, (x, y), method="dmbq", w_bits=1.5, a_bits=2, lba="channel", lba_every=1, epochs=1,
                   batch_size=16, progress=False, log=lambda s: None)
    # make sure some channel is pruned and the widths differ, whatever the short run allocated
    wq = next(m.weight_quant for _, m in quant_layers(q) if isinstance(m.weight_quant, DmbqWeight))
    wq.channel_bits[0] = 0
    layer = next(m for _, m in quant_layers(q) if m.weight_quant is wq)
    with torch.no_grad():
        layer.weight[0] = 0
    return fp, q, x


def test_artifact_round_trip_identical_predictions(trained, tmp_path):
    fp, q, x = trained
    path = lowbit.export(q, tmp_path / "m.lowbit")
    back = lowbit.load(path, model=fp)
    with torch.no_grad():
        assert torch.equal(q(x), back(x))
    for (n, a), (_, b) in zip(quant_layers(q), quant_layers(back)):
        assert type(a.weight_quant) is type(b.weight_quant), n
        if isinstance(a.weight_quant, DmbqWeight):
            assert torch.equal(a.weight_quant.channel_bits, b.weight_quant.channel_bits)
            assert torch.equal(a.weight, b.weight)
        if isinstance(a.input_quant, DmbqAct):
            assert torch.equal(a.input_quant.alpha, b.input_quant.alpha) and a.input_quant.signed == b.input_quant.signed
    assert lowbit.summary(back).totals == lowbit.summary(q).totals


def test_planes_blob_is_one_bit_per_weight_per_base_and_pruned_channels_cost_nothing(trained, tmp_path):
    _, q, _ = trained
    path = lowbit.export(q, tmp_path / "m.lowbit")
    expected = 0
    for _, m in quant_layers(q):
        wq = m.weight_quant
        if isinstance(wq, DmbqWeight):
            n = m.weight.numel() // wq.channels
            expected += (n * int(wq.channel_bits.sum()) + 7) // 8  # 0-bit channels add nothing
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor(PLANES_KEY).numel() == expected
    assert any(isinstance(m.weight_quant, DmbqWeight) and m.weight_quant.pruned_channels for _, m in quant_layers(q))


def test_onnx_has_no_dequantize_and_matches_onnxruntime(trained, tmp_path):
    _, q, x = trained
    path = lowbit.export(q, tmp_path / "m.onnx")
    ops = multibit_onnx_ops(path)
    assert "DequantizeLinear" not in ops and "Greater" in ops and "Cast" in ops
    import onnx

    model = onnx.load(str(path))
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8  # the sign planes are in the file, not a folded float weight
    got = torch.from_numpy(onnx_session(path).run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        want = q(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_one_artifact_format_sized_as_counted_with_every_spec_stored(trained, tmp_path):
    """A DMBQ model is a version-4 lowbit artifact; its tensor data is deploy.size's count, byte for byte."""
    fp, q, _ = trained
    path = lowbit.export(q, tmp_path / "m.lowbit")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT and f.metadata()["version"] == VERSION
    assert data_bytes(path) == quantized_bytes(q)
    specs = layer_specs(q)
    assert {s.weight.kind for s in specs if s.weight} == {"uniform", "multibit"}  # 8-bit first/last layers
    assert read_artifact(path)[0][SPECS_KEY] == {s.name: s for s in specs}
    assert layer_specs(lowbit.load(path, model=fp)) == specs


def test_a_fully_pruned_layer_stores_nothing_and_loads(trained, tmp_path):
    fp, q, x = trained
    q = copy.deepcopy(q)
    name, layer = [(n, m) for n, m in quant_layers(q) if isinstance(m.weight_quant, DmbqWeight)][1]
    layer.weight_quant.channel_bits.zero_()
    with torch.no_grad():
        layer.weight.zero_()
    path = lowbit.export(q, tmp_path / "m.lowbit")
    assert data_bytes(path) == quantized_bytes(q)
    manifest = json.loads(safe_open(str(path), framework="pt").metadata()["manifest"])
    row = next(dict(zip(manifest["fields"], r)) for r in manifest["layers"] if r[0] == name)
    assert row["w_bits"] == 0 and manifest["group_bits"][name] == "0" * layer.weight_quant.channels
    with torch.no_grad():
        assert torch.equal(lowbit.load(path, model=fp)(x), q(x))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    return lowbit.export(trained[1], tmp_path_factory.mktemp("dmbq") / "m.lowbit")


def _raw(path: Path) -> tuple[dict, dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    return meta, json.loads(meta["manifest"]), tensors


def _row(m: dict, i: int, field: str, value) -> None:
    m["layers"][i][m["fields"].index(field)] = value


def _alphas_nan(m: dict, t: dict) -> None:
    """The first multibit weight's first alpha (after the uniform first layer's scales and bias) made NaN."""
    first = dict(zip(m["fields"], m["layers"][0]))
    t[PARAMS_KEY] = t[PARAMS_KEY].clone()
    t[PARAMS_KEY][first["groups"] * (1 + first["zp"]) + first["out"] * first["bias"]] = float("nan")


MULTIBIT = 1  # the row of the first DMBQ layer (layers.0.0.conv1, channel 0 pruned: bases [0, 2, 2, 2])


@pytest.mark.parametrize("edit, message", [
    (lambda m, t: t.update({PLANES_KEY: t[PLANES_KEY][:-1]}), "planes blob is too short"),
    (lambda m, t: t.update({PLANES_KEY: torch.cat([t[PLANES_KEY], t[PLANES_KEY][:1]])}), "planes blob is longer"),
    (lambda m, t: t.pop(PLANES_KEY), "planes blob is too short"),
    (lambda m, t: t.update({PARAMS_KEY: t[PARAMS_KEY][:-1]}), "params blob is too short"),
    (_alphas_nan, r"layer 'layers.0.0.conv1': weight_quant.alphas must be finite, got nan"),
    (lambda m, t: _row(m, MULTIBIT, "w_bits", 9), r"layer 'layers.0.0.conv1': w_bits must be an integer 0..4"),
    (lambda m, t: _row(m, MULTIBIT, "zp", 1), "zp must be 0 for a multibit weight"),
    (lambda m, t: _row(m, MULTIBIT, "groups", 1), "groups must be 4, one per output channel .a multibit weight"),
    (lambda m, t: _row(m, MULTIBIT, "a_bits", 7), r"a_bits must be an integer 1..4"),
    (lambda m, t: m["group_bits"].update({"layers.0.0.conv1": "0223"}),
     r"group_bits\['layers.0.0.conv1'\] must be a list of 4 integers from 0 to 2"),
    (lambda m, t: m["group_bits"].update({"layers.0.0.conv1": "022"}), r"group_bits\['layers.0.0.conv1'\]"),
    (lambda m, t: m["group_bits"].pop("layers.0.0.conv1"), "planes blob is too short"),  # read as 2 bases each
    (lambda m, t: m[CODE_BOOKS_KEY].__setitem__(m[SPECS_KEY][2 * MULTIBIT], ["uniform", 2, 1, 1, 0, "channel"]),
     # [0, 2, 2, 2] are valid uniform widths (a pruned channel), so the uniform codes are what is missing
     # (the book is shared: other layers, with 1-base channels, turn uniform too and need codes1 first)
     r"no codes([12]) blob for its \1-bit layers"),
])
def test_damaged_multibit_fields_are_refused(trained, exported, tmp_path, edit, message):
    meta, manifest, tensors = _raw(exported)
    assert manifest["group_bits"]["layers.0.0.conv1"] == "0222"  # what the cases assume
    edit(manifest, tensors)
    bad = tmp_path / "bad.lowbit"
    save_file(tensors, str(bad), metadata={**meta, "manifest": json.dumps(manifest)})
    with pytest.raises(LowbitError, match=message):
        lowbit.load(bad, model=trained[0])


def test_lowbit_multibit_files_written_before_version_4_still_load(tmp_path):
    expected = load_file(str(LEGACY_EXPECTED))
    old = lowbit.load(LEGACY)  # the file names its zoo architecture
    with torch.no_grad():
        assert torch.equal(old(expected["images"]), expected["logits"])
    assert old.lowbit_info["method"] == "dmbq" and old.lowbit_info["layer_bits"]["fc"]["w_bits"] == 8
    assert any(isinstance(m.weight_quant, DmbqWeight) and m.weight_quant.pruned_channels for _, m in quant_layers(old))
    again = lowbit.export(old, tmp_path / "v4.lowbit")  # rewritten in version 4: the same model
    assert read_artifact(again)[0][SPECS_KEY] == read_artifact(LEGACY)[0][SPECS_KEY]
    with torch.no_grad():
        assert torch.equal(lowbit.load(again)(expected["images"]), expected["logits"])


@pytest.mark.parametrize("edit, message", [
    (lambda d, m, t: t.update({PARAMS_KEY: t[PARAMS_KEY][:-2]}), "params blob is too short"),
    (lambda d, m, t: t.update({"planes": t["planes"][:5]}), "planes blob is too short"),
    (lambda d, m, t: d.update(version="2"), "multi-bit artifact version '2' is not supported"),
    (lambda d, m, t: m["layers"][1]["w"].update(channel_bits=[0, 2, 9, 2]), "params blob is too short"),
    (lambda d, m, t: m["layers"][1]["w"].update(channel_bits=[0, 2, 2]), "channel_bits must list the 4 channels"),
    (lambda d, m, t: m["layers"][1].update(kind="conv9d"), "kind and shape must name a layer kind"),
])
def test_damaged_lowbit_multibit_files_are_refused(tmp_path, edit, message):
    meta, manifest, tensors = _raw(LEGACY)
    edit(meta, manifest, tensors)
    bad = tmp_path / "bad.lowbit"
    save_file(tensors, str(bad), metadata={**meta, "manifest": json.dumps(manifest)})
    with pytest.raises(LowbitError, match=f"{bad}: .*{message}"):
        lowbit.load(bad)


def test_integer_reference_is_refused_with_a_reason(trained):
    _, q, _ = trained
    with pytest.raises(LowbitError, match="integer grid"):
        lowbit.integer_model(q)


@pytest.mark.parametrize("build, data", [
    (lambda: layer_kind_models.make(layer_kind_models.DecoderClassifier), lambda: layer_kind_models.images(16)),
    (lambda: layer_kind_models.make(layer_kind_models.Net1d), lambda: layer_kind_models.signals(16)),
], ids=["convtranspose2d-grouped", "conv1d-linear"])
def test_other_layer_kinds_round_trip(build, data, tmp_path):
    """Channel axis 1 (ConvTranspose, grouped), 1-D convs: planes and alphas along each kind's own axis."""
    fp, x = build(), data()
    with torch.no_grad():
        y = fp(x).argmax(1)
    q = lowbit.qat(fp, (x, y), method="dmbq", w_bits=1.5, a_bits=2, lba="channel", lba_every=1, epochs=1,
                   batch_size=8, progress=False, log=lambda s: None)
    assert "multibit" in {s.weight.kind for s in layer_specs(q) if s.weight}
    path = lowbit.export(q, tmp_path / "m.lowbit")
    assert data_bytes(path) == quantized_bytes(q)
    back = lowbit.load(path, model=fp)
    assert layer_specs(back) == layer_specs(q)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
