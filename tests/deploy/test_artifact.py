"""The packed artifact: compact layout, size against the theoretical one, input shape, old versions, damage."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit import LowbitError
from lowbit.deploy import read_artifact
from lowbit.deploy.artifact import FIELDS, FORMAT, PARAMS_KEY, VERSION
from lowbit.deploy.size import quantized_bytes
from lowbit.quant.layers import quant_layers
from tests.conftest import IMAGE_SIZE, calib_tensor, make_model


def raw_header(path: Path) -> tuple[int, dict]:
    """Length and content of a safetensors file's JSON header."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8:8 + length])


def data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (everything after the header)."""
    return path.stat().st_size - 8 - raw_header(path)[0]


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_layout_is_one_blob_per_bit_width_and_a_compact_manifest(tmp_path) -> None:
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=4, a_bits=4)
    path = lowbit.export(q, tmp_path / "m.lowbit")
    _, header = raw_header(path)
    meta = header.pop("__metadata__")
    assert set(header) == {"codes4", "codes8", PARAMS_KEY}  # first/last layers at 8 bit, the body at 4
    assert {header[k]["dtype"] for k in ("codes4", "codes8")} == {"U8"} and header[PARAMS_KEY]["dtype"] == "F32"
    assert meta["format"] == FORMAT and meta["version"] == VERSION
    manifest = json.loads(meta["manifest"])
    assert meta["manifest"] == json.dumps(manifest, separators=(",", ":"))  # no indentation, no padding
    # self-describing: the architecture, config, method, column names and the params layout are in the file
    assert manifest["arch"]["name"] == "resnet20" and manifest["method"] == "minmax"
    assert manifest["config"]["w_bits"] == 4 and manifest["config"]["granularity"] == "channel"
    assert manifest["fields"] == list(FIELDS) and "scale" in manifest["params"]
    rows = [dict(zip(manifest["fields"], row)) for row in manifest["layers"]]
    assert [r["name"] for r in rows] == q.lowbit_info["layer_order"]  # stored in execution order
    assert {(r["name"], r["bn"]) for r in rows if r["bn"]} == {tuple(p) for p in q.lowbit_info["fold_pairs"]}
    assert not any(r["zp"] for r in rows)  # symmetric weights: no zero points stored


@pytest.mark.filterwarnings("ignore:lowbit. model cannot be traced")
@pytest.mark.parametrize("name, options", [
    ("resnet20", {"w_bits": 4, "a_bits": 4}),
    ("resnet20", {"w_bits": 2, "a_bits": 4}),
    ("resnet20", {"w_bits": 3, "a_bits": 3, "w_symmetric": False, "quantize_all": True}),
    ("resnet20", {"w_bits": 1, "a_bits": None, "granularity": "group", "groups": 2}),
    ("resnet20", {"w_bits": 4, "a_bits": 4, "fold_bn": False}),
    ("mobilenetv2", {"w_bits": 2, "a_bits": 4}),
    ("zoofree", {"w_bits": 4, "a_bits": 8, "method": "bitsplit", "samples": 2000}),
], ids=str)
def test_file_data_is_exactly_the_theoretical_size(name, options, tmp_path) -> None:
    """Codes at their width, scales, zero points, biases: size.py's count, byte for byte, plus the header."""
    q = lowbit.quantize(make_model(name), calib_tensor(16), **options)
    path = lowbit.export(q, tmp_path / "m.lowbit")
    assert data_bytes(path) == quantized_bytes(q)
    if q.lowbit_info["config"]["fold_bn"]:  # (unfolded BN tensors are stored by name, each with its entry)
        assert raw_header(path)[0] < 1024 + 120 * len(quant_layers(q))


def test_pretrained_resnet20_w4a4_is_within_5_percent_of_theoretical(tmp_path) -> None:
    """The issue's size criterion on a real model: the header costs a few KB at most."""
    fp = lowbit.load_pretrained("resnet20")
    q = lowbit.quantize(fp, calib_tensor(16, size=28), w_bits=4, a_bits=4)
    path = lowbit.export(q, tmp_path / "r20.lowbit")
    theoretical = quantized_bytes(q)
    assert abs(path.stat().st_size / theoretical - 1) <= 0.05, (path.stat().st_size, theoretical)
    loaded = lowbit.load(path)
    x = calib_tensor(4, size=28, seed=5)
    assert torch.equal(logits(loaded, x), logits(q, x))


def test_input_shape_is_recorded_stored_and_used_by_onnx(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = make_model("resnet20")
    batches = [(calib_tensor(8, seed=s), torch.zeros(8)) for s in range(2)]  # an iterable of (input, label)
    q = lowbit.quantize(model, batches, w_bits=4, a_bits=4)
    assert q.lowbit_info["input_shape"] == [1, IMAGE_SIZE, IMAGE_SIZE]
    path = lowbit.export(q, tmp_path / "m.lowbit")
    assert read_artifact(path)[0]["input_shape"] == [1, IMAGE_SIZE, IMAGE_SIZE]
    loaded = lowbit.load(path, model=model)
    assert loaded.lowbit_info["input_shape"] == [1, IMAGE_SIZE, IMAGE_SIZE]
    assert loaded.lowbit_info["layer_order"] == q.lowbit_info["layer_order"]
    for source in (q, loaded):  # no input_shape given: the recorded one (not the 28x28 fallback)
        graph = onnx.load(str(lowbit.export(source, tmp_path / "m.onnx"))).graph
        dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        assert dims[1:] == [1, IMAGE_SIZE, IMAGE_SIZE]
    wide = lowbit.quantize(make_model("resnet20"), calib_tensor(4, size=20), w_bits=8, a_bits=8)
    assert wide.lowbit_info["input_shape"] == [1, 20, 20]


def test_version_1_artifacts_still_load(tmp_path) -> None:
    """Version 1 stored the expanded view (one tensor per layer field); read_artifact yields that view."""
    model = make_model("zoofree")
    q = lowbit.quantize(model, calib_tensor(16), w_bits=3, a_bits=4, w_symmetric=False)
    manifest, tensors = read_artifact(lowbit.export(q, tmp_path / "v2.lowbit"))
    v1 = tmp_path / "v1.lowbit"
    old = {k: manifest[k] for k in ("arch", "method", "config", "options", "fold_pairs", "layers")}
    for spec in old["layers"].values():  # version 1 named kinds "conv"/"linear" and had no out_channels
        spec["kind"] = {"conv2d": "conv", "linear": "linear"}[spec["kind"]]
        del spec["out_channels"]
    save_file(tensors, str(v1), metadata={"format": FORMAT, "version": "1", "manifest": json.dumps(old)})
    x = calib_tensor(8, seed=3)
    assert torch.equal(logits(lowbit.load(v1, model=model), x), logits(q, x))


def _rewrite(path: Path, out: Path, tensors=None, manifest=None) -> Path:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}
    if tensors:
        stored.update(tensors(stored))
    if manifest:
        meta = {**meta, "manifest": json.dumps(manifest(json.loads(meta["manifest"])))}
    save_file(stored, str(out), metadata=meta)
    return out


def test_damaged_blobs_and_manifests_are_clear_errors(tmp_path) -> None:
    model = make_model("resnet20")
    good = lowbit.export(lowbit.quantize(model, calib_tensor(16), w_bits=4, a_bits=4), tmp_path / "m.lowbit")
    cases = [
        ({"tensors": lambda t: {PARAMS_KEY: t[PARAMS_KEY][:-3]}}, "params blob is too short"),
        ({"tensors": lambda t: {PARAMS_KEY: torch.cat([t[PARAMS_KEY], torch.zeros(2)])}}, "longer than"),
        ({"tensors": lambda t: {"codes4": t["codes4"][:10]}}, "codes4 blob is too short"),
        ({"tensors": lambda t: {"codes3": torch.zeros(4, dtype=torch.uint8)}}, "no layer"),
        ({"manifest": lambda m: {**m, "fields": m["fields"][:-1]}}, "missing or damaged"),
        ({"manifest": lambda m: {k: v for k, v in m.items() if k != "layers"}}, "missing or damaged"),
    ]
    for i, (change, message) in enumerate(cases):
        bad = _rewrite(good, tmp_path / f"bad{i}.lowbit", **change)
        with pytest.raises(LowbitError, match=message):
            lowbit.load(bad, model=model)


def test_reserved_tensor_names_are_refused(tmp_path) -> None:
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=4, a_bits=4)
    for name in (PARAMS_KEY, "codes3"):  # (no layer of q has 3-bit codes)
        q.register_buffer(name, torch.zeros(1))
        with pytest.raises(LowbitError, match="reserves"):
            lowbit.export(q, tmp_path / "m.lowbit")
        delattr(q, name)
    assert list(tmp_path.iterdir()) == []


def test_disabled_quantizers_store_nothing(tmp_path) -> None:
    """The first layer's input stays float: neither its input scale nor zero point is in the file."""
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=4, a_bits=4)
    first = q.lowbit_info["layer_order"][0]
    assert not dict(quant_layers(q))[first].input_quant.enabled
    _, tensors = read_artifact(lowbit.export(q, tmp_path / "m.lowbit"))
    assert f"{first}.input_quant.scale" not in tensors and f"{first}.weight_quant.scale" in tensors
