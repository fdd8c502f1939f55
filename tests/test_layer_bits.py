"""Per-layer bit widths (``layer_bits``): resolution, every method honouring it, export, load, ONNX, integer path."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import lowbit
from lowbit import LowbitError
from lowbit.deploy.integer import integer_agreement, integer_model
from lowbit.layer_bits import LayerBits, parse_cli_entry, resolve_layer_bits
from lowbit.quant.layers import quant_layers
from tests.conftest import IMAGE_SIZE, calib_tensor, make_model

# resnet20 (tiny): conv1, layers.{0,1,2}.{0,1,2}.conv{1,2}, layers.{1,2}.0.shortcut.0, fc
MIXED = {"layers.0.*": 2, "layers.1.*": (3, 8), "*.conv2": 4, "layers.2.*.conv1": (8, None), "fc": None}


def expected_mixed(name: str) -> tuple[int | None, int | None]:
    """The widths MIXED gives each resnet20 layer (W4A4 defaults, 8-bit first/last), worked out by hand."""
    if name == "conv1":
        return 8, None  # protocol: 8-bit first layer, float network input
    if name == "fc":
        return None, None
    if name.endswith(".conv2"):  # "*.conv2" comes after the block patterns: it wins, the input keeps its width
        return 4, 8 if name.startswith("layers.1.") else 4
    if name.startswith("layers.0."):
        return 2, 4
    if name.startswith("layers.1."):
        return 3, 8
    return 8, None  # layers.2.*.conv1 (the layers.2 shortcut is set in mixed_expectation)


def bits_of(q) -> dict[str, tuple[int | None, int | None]]:
    return {n: (l.weight_quant.bits if l.weight_quant.enabled else None,
                l.input_quant.bits if l.input_quant.enabled else None) for n, l in quant_layers(q)}


def mixed_expectation(q) -> dict[str, tuple[int | None, int | None]]:
    out = {}
    for name in bits_of(q):
        if name.startswith("layers.2.") and "shortcut" in name:
            out[name] = (4, 4)  # no pattern matches it: the body defaults
        else:
            out[name] = expected_mixed(name)
    return out


@pytest.fixture(scope="module")
def fp():
    return make_model("resnet20")


@pytest.fixture(scope="module")
def mixed(fp):
    return lowbit.quantize(fp, calib_tensor(16), w_bits=4, a_bits=4, layer_bits=MIXED)


def test_patterns_later_win_pairs_float_layers(mixed) -> None:
    assert bits_of(mixed) == mixed_expectation(mixed)
    record = mixed.lowbit_info["layer_bits"]
    assert record["fc"] == {"w_bits": None, "a_bits": None, "enabled": False}
    assert record["layers.1.0.conv1"] == {"w_bits": 3, "a_bits": 8, "enabled": True}
    assert {n: (r["w_bits"], r["a_bits"]) for n, r in record.items()} == bits_of(mixed)
    # the record is explicit and JSON: no per-module attribute carries it
    json.dumps(mixed.lowbit_info["layer_bits"])


def test_resolution_order_and_defaults() -> None:
    names, order = ["a", "b.x", "b.y", "c"], ["a", "b.x", "b.y", "c"]
    base = dict(w_bits=4, a_bits=4, first_last_bits=8, quantize_input=False)
    plain = resolve_layer_bits(names, order, **base)
    assert plain == {"a": LayerBits(8, None), "b.x": LayerBits(4, 4), "b.y": LayerBits(4, 4), "c": LayerBits(8, 8)}
    # a user entry wins over the default first/last entry; later patterns win over earlier ones
    got = resolve_layer_bits(names, order, **base, layer_bits={"b.*": 2, "b.y": 3, "c": 5, "a": (6, 7)})
    assert got == {"a": LayerBits(6, 7), "b.x": LayerBits(2, 4), "b.y": LayerBits(3, 4), "c": LayerBits(5, 8)}
    got = resolve_layer_bits(names, order, **base, layer_bits={"b.y": 3, "b.*": 2})
    assert got["b.y"] == LayerBits(2, 4)
    # an int after None brings the layer back with its default input width
    got = resolve_layer_bits(names, order, **base, layer_bits={"*": None, "c": 6})
    assert got == {"a": LayerBits(None, None), "b.x": LayerBits(None, None), "b.y": LayerBits(None, None),
                   "c": LayerBits(6, 8)}
    # no protocol: first/last like the body
    assert resolve_layer_bits(names, order, 4, 4, None, True)["c"] == LayerBits(4, 4)
    # a layer never called stays float whatever the map says
    assert resolve_layer_bits(names, ["a", "b.x"], **base, layer_bits={"c": 4})["c"] == LayerBits(None, None)


def test_default_protocol_entry_overridden_in_a_model(fp) -> None:
    q = lowbit.quantize(fp, calib_tensor(16), w_bits=4, a_bits=4, layer_bits={"conv1": 3, "fc": (2, 3)})
    bits = bits_of(q)
    assert bits["conv1"] == (3, None) and bits["fc"] == (2, 3)
    assert bits["layers.0.0.conv1"] == (4, 4)


@pytest.mark.parametrize("layer_bits,match", [
    ({"nothing.*": 4}, r"pattern 'nothing\.\*' matches no quantizable layer \(layers: 'conv1', "),
    ({"fc": 0}, r"option layer_bits must be .*got 0"),
    ({"fc": 17}, r"option layer_bits must be"),
    ({"fc": (4,)}, r"option layer_bits must be"),
    ({"fc": (4, 4, 4)}, r"option layer_bits must be"),
    ({"fc": "4"}, r"option layer_bits must be"),
    ({"fc": True}, r"option layer_bits must be"),
    ({"fc": (None, 4)}, r"option layer_bits must be"),
    ({4: 4}, r"option layer_bits must be"),
    (["fc", 4], r"option layer_bits must be"),
])
def test_bad_maps_are_errors(fp, layer_bits, match) -> None:
    with pytest.raises(LowbitError, match=match):
        lowbit.quantize(fp, calib_tensor(4), layer_bits=layer_bits)


def test_fp_model_is_untouched(fp) -> None:
    before = copy.deepcopy(fp.state_dict())
    lowbit.quantize(fp, calib_tensor(8), layer_bits=MIXED)
    assert all(torch.equal(before[k], v) for k, v in fp.state_dict().items())
    assert not any(hasattr(m, "weight_quant") for m in fp.modules())


def _check_codes_in_range(q) -> None:
    for name, layer in quant_layers(q):
        wq = layer.weight_quant
        if not wq.enabled:
            continue
        codes = wq.quantize(layer.weight).int_value
        lo, hi = (-1, 1) if wq.binary else wq.qrange
        assert lo <= codes.min() and codes.max() <= hi, name
        # the simulated weight sits on the layer's own grid: at most 2^bits distinct levels per channel
        w = wq(layer.weight.detach())
        per_channel = w.movedim(wq.axis, 0).reshape(w.shape[wq.axis], -1)
        assert max(len(row.unique()) for row in per_channel) <= 2 ** wq.bits, name


METHODS = {"minmax": {}, "mse": {}, "aciq": {}, "bitsplit": {"samples": 200},
           "brecq": {"iters": 2}, "qdrop": {"iters": 2}, "distill": {"block_iters": 2, "joint_iters": 2}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_honours_the_map(fp, method) -> None:
    if method not in lowbit.methods():
        pytest.skip(f"{method} not registered")
    q = lowbit.quantize(fp, calib_tensor(16), w_bits=4, a_bits=4, method=method, layer_bits=MIXED, **METHODS[method])
    assert bits_of(q) == mixed_expectation(q)
    _check_codes_in_range(q)
    if method != "distill":  # distill fine-tunes every weight jointly, float layers' included
        fc = dict(quant_layers(q))["fc"]
        assert torch.equal(fc.weight, dict(fp.named_parameters())["fc.weight"])  # the float layer: untouched


@pytest.mark.parametrize("method", ["lsq", "gdrq"])
def test_qat_honours_the_map(fp, method) -> None:
    x, y = calib_tensor(16), torch.arange(16) % 10
    q = lowbit.qat(fp, (x, y), method=method, epochs=1, batch_size=8, log=lambda s: None, layer_bits=MIXED)
    assert bits_of(q) == mixed_expectation(q)
    assert q.lowbit_info["layer_bits"]["fc"]["enabled"] is False
    _check_codes_in_range(q)


def test_artifact_round_trip_and_tampered_rows(mixed, fp, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = lowbit.export(mixed, tmp_path / "m.lowbit")
    loaded = lowbit.load(path, model=fp)
    images = calib_tensor(16, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(images), mixed(images))
    assert bits_of(loaded) == bits_of(mixed)
    assert loaded.lowbit_info["layer_bits"] == mixed.lowbit_info["layer_bits"]
    assert lowbit.load(lowbit.export(loaded, tmp_path / "again.lowbit"), model=fp).lowbit_info["layer_bits"] \
        == mixed.lowbit_info["layer_bits"]

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(meta["manifest"])
    names = [row[0] for row in manifest["layers"]]
    col = manifest["fields"].index

    def tampered(change) -> str:
        m = json.loads(meta["manifest"])
        change(m)
        bad = tmp_path / "bad.lowbit"
        save_file(tensors, str(bad), metadata={**meta, "manifest": json.dumps(m)})
        with pytest.raises(LowbitError) as info:
            lowbit.load(bad, model=fp)
        return str(info.value)

    i = names.index("layers.0.0.conv1")  # 2-bit weights, 4-bit input by the map

    def a_bits_8(m):
        m["layers"][i][col("a_bits")] = 8

    assert "a_bits must be 4 for a 'body' layer as the artifact's layer_bits say" in tampered(a_bits_8)

    def a_off(m):
        m["layers"][i][col("a")] = 0

    assert "a must be 1" in tampered(a_off)

    def map_entry(m):
        m["layer_bits"][i] = [2, "4"]

    assert "layer_bits[" in tampered(map_entry)

    def map_short(m):
        m["layer_bits"] = m["layer_bits"][:-1]

    assert "one entry per layer row" in tampered(map_short)
    j = names.index("fc")

    def fc_on(m):  # the float layer's row claims quantized weights
        m["layers"][j][col("w")] = 1

    assert "w must be 0" in tampered(fc_on)


def test_onnx_runtime_parity_with_mixed_widths(mixed, tmp_path) -> None:
    from lowbit.deploy.onnx_qdq import onnx_weight_report

    from tests.deploy.test_onnx import assert_matches_simulation

    # 1, 2, 3, 4, 8 bits and float layers in one graph
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(32), w_bits=4, a_bits=4,
                        layer_bits={**MIXED, "layers.2.0.conv2": 1})
    path = lowbit.export(q, tmp_path / "m.onnx", input_shape=(1, IMAGE_SIZE, IMAGE_SIZE))
    assert_matches_simulation(q, path, calib_tensor(64, seed=3))
    types = {row["name"][: -len(".weight_q")]: row["type"] for row in onnx_weight_report(path)}
    assert types["layers.0.0.conv1"] == "INT2" and types["layers.1.0.conv1"] == "INT4"  # 2 and 3 bit
    assert types["layers.0.0.conv2"] == "INT4" and types["layers.2.0.conv1"] == "INT8"
    assert types["layers.2.0.conv2"] == "INT2"  # binary
    assert "fc" not in types  # the float layer has no quantized weight


def test_integer_path_with_mixed_widths(mixed) -> None:
    images = calib_tensor(32, seed=7)
    imodel = integer_model(mixed, bias_frac_bits=16)
    layers = dict(quant_layers(mixed))
    assert set(imodel.integer_layers) == {n for n, l in layers.items() if l.input_quant.enabled
                                          and l.weight_quant.enabled}
    res = integer_agreement(mixed, images, imodel)
    assert res["argmax_agreement"] == 100.0, res
    assert res["code_agreement"] >= 99.8, res


def test_parse_cli_entry() -> None:
    assert parse_cli_entry("layers.0.*=8") == ("layers.0.*", 8)
    assert parse_cli_entry("fc=fp") == ("fc", None)
    assert parse_cli_entry("conv1=4,8") == ("conv1", (4, 8))
    assert parse_cli_entry("conv1=4,fp") == ("conv1", (4, None))
    for bad in ("fc", "=4", "fc=", "fc=x", "fc=4,8,8", "fc=0", "fc=fp,4", "fc=17"):
        with pytest.raises(LowbitError):
            parse_cli_entry(bad)
