"""Per-layer bit widths (``layer_bits``): resolution, every method honouring it, export, load, ONNX, integer path."""
from __future__ import annotations

import copy
import json

import numpy as np
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
    ({"fc": (4,)}, r"layer 'fc' has 10 output channels, the per-channel widths give 1"),  # per channel
    ({"fc": (4, 4, 4)}, r"layer 'fc' has 10 output channels, the per-channel widths give 3"),
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


METHODS = {"minmax": {}, "mse": {"candidates": 10}, "aciq": {}, "bitsplit": {"samples": 200},
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


# ------------------------------------------------------------------------------ per-channel widths
# layers.0.0.conv1 has 4 output channels, layers.1.0.conv1 8, layers.2.0.conv2 16
CHANNEL = {"layers.0.0.conv1": [4, 2, 0, 1], "layers.1.0.conv1": ([3, 3, 2, 8, 1, 1, 0, 4], 8),
           "layers.2.0.conv2": torch.tensor([8, 0] * 8)}
CHANNEL_WIDTHS = {"layers.0.0.conv1": (4, 2, 0, 1), "layers.1.0.conv1": (3, 3, 2, 8, 1, 1, 0, 4),
                  "layers.2.0.conv2": (8, 0) * 8}


def _check_channel_widths(q, fp_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Every per-channel layer: recorded widths, pruned channels exactly 0, binary ones +-scale, others on
    their own grid, codes inside each channel's range."""
    layers = dict(quant_layers(q))
    record = lowbit.record_of(q).layer_bits
    for name, widths in CHANNEL_WIDTHS.items():
        layer, wq = layers[name], layers[name].weight_quant
        assert record[name].channel_bits == widths and wq.group_bits == widths, name
        assert record[name].w_bits == wq.bits == max(widths) and wq.num_groups == wq.channels
        w = wq(layer.weight.detach())
        codes = wq.quantize(layer.weight.detach()).int_value
        lo, hi = wq.group_qranges()
        for c, b in enumerate(widths):
            assert lo[c] <= codes[c].min() and codes[c].max() <= hi[c], (name, c, b)  # the channel's own range
            if b == 0:
                assert torch.equal(w[c], torch.zeros_like(w[c])) and torch.equal(codes[c], torch.zeros_like(codes[c]))
            elif b == 1 and wq.signed:  # binary, as a 1-bit layer
                assert set(w[c].flatten().tolist()) <= {wq.scale[c].item(), -wq.scale[c].item()}, (name, c)
            else:
                assert hi[c] - lo[c] == 2 ** b - 1 - (wq.signed and wq.narrow)
                assert len(w[c].unique()) <= 2 ** b, (name, c, b)


@pytest.fixture(scope="module")
def channel_model(fp):
    return lowbit.quantize(fp, calib_tensor(16), w_bits=4, a_bits=4, layer_bits={**MIXED, **CHANNEL})


def test_channel_widths_resolve_and_record(channel_model) -> None:
    _check_channel_widths(channel_model)
    info = channel_model.lowbit_info["layer_bits"]
    assert info["layers.0.0.conv1"] == {"w_bits": 4, "a_bits": 4, "enabled": True, "channel_bits": [4, 2, 0, 1]}
    assert info["layers.1.0.conv1"]["a_bits"] == 8  # the pair's input width
    assert "channel_bits" not in info["layers.0.0.conv2"]  # per-layer entries keep their form
    from lowbit.layer_bits import from_record

    assert from_record(json.loads(json.dumps(info))) == lowbit.record_of(channel_model).layer_bits
    # a later per-layer entry replaces per-channel widths; a per-channel one keeps the input width
    names, order = ["a", "b"], ["a", "b"]
    got = resolve_layer_bits(names, order, 4, 4, None, True, {"*": [2, 0, 1], "b": 3}, {"a": 3, "b": 3})
    assert got == {"a": LayerBits(2, 4, (2, 0, 1)), "b": LayerBits(3, 4)}
    got = resolve_layer_bits(names, order, 4, 4, None, True, {"a": (6, 8), "*": [1, 0, 1]}, {"a": 3, "b": 3})
    assert got["a"] == LayerBits(2, 8, (1, 0, 1))  # 1-bit beside pruned channels: stored at 2 bits


@pytest.mark.parametrize("layer_bits, match", [
    ({"layers.0.0.conv1": [4, 4, 4]}, r"layer 'layers\.0\.0\.conv1' has 4 output channels, the per-channel widths "
                                      r"give 3"),
    ({"layers.*.0.conv1": [4, 4, 4, 4]}, r"layer 'layers\.1\.0\.conv1' has 8 .* matches layers of \[4, 8, 16\]"),
    ({"fc": [4] * 9 + [17]}, r"integers from 0 to 16 .* got 17"),
    ({"fc": [4] * 9 + [True]}, r"integers from 0 to 16"),
    ({"fc": [0] * 10}, r"every channel is pruned"),
    ({"fc": torch.ones(10)}, r"1-D of an integer dtype"),
    ({"fc": torch.ones(2, 5, dtype=torch.int64)}, r"1-D of an integer dtype"),
    ({"fc": ([4] * 10, 0)}, r"option layer_bits must be"),
])
def test_bad_channel_widths_are_errors(fp, layer_bits, match) -> None:
    with pytest.raises(LowbitError, match=match):
        lowbit.quantize(fp, calib_tensor(4), layer_bits=layer_bits)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_honours_a_channel_map(fp, method) -> None:
    q = lowbit.quantize(fp, calib_tensor(16), w_bits=4, a_bits=4, method=method, layer_bits=CHANNEL, **METHODS[method])
    _check_channel_widths(q)


def test_methods_that_cannot_honour_channel_widths_say_so(fp) -> None:
    with pytest.raises(LowbitError, match="aciq-mix allocates every layer's per-channel widths itself"):
        lowbit.quantize(fp, calib_tensor(8), method="aciq-mix", layer_bits=CHANNEL)
    x, y = calib_tensor(8), torch.arange(8) % 10
    for method in ("gdrq", "tsq", "dmbq"):
        with pytest.raises(LowbitError, match=f"QAT method '{method}' cannot honour per-channel weight widths.*'lsq'"):
            lowbit.qat(fp, (x, y), method=method, epochs=1, log=lambda s: None, layer_bits=CHANNEL)


def test_lsq_trains_a_channel_map_and_folds_bn_per_channel(fp, tmp_path) -> None:
    """LSQ keeps each channel on its own grid through training and the BN fold (pruned channels 0,
    binary ones sign times step), and the artifact reloads it exactly."""
    x, y = calib_tensor(16), torch.arange(16) % 10
    q = lowbit.qat(fp, (x, y), method="lsq", epochs=1, batch_size=8, log=lambda s: None, layer_bits=CHANNEL)
    _check_channel_widths(q)
    assert lowbit.summary(q).totals["pruned_channels"] == sum(w.count(0) for w in CHANNEL_WIDTHS.values())
    loaded = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), model=fp)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_channel_widths_artifact_round_trip(fp, channel_model, granularity, tmp_path) -> None:
    q = channel_model if granularity == "channel" else lowbit.quantize(
        fp, calib_tensor(16), w_bits=4, a_bits=4, layer_bits=CHANNEL, granularity="tensor")
    loaded = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), model=fp)
    images = calib_tensor(16, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    assert lowbit.record_of(loaded).layer_bits == lowbit.record_of(q).layer_bits
    _check_channel_widths(loaded)
    again = lowbit.load(lowbit.export(loaded, tmp_path / "again.lowbit"), model=fp)
    assert lowbit.record_of(again).layer_bits == lowbit.record_of(q).layer_bits


def test_channel_widths_onnx_parity_and_pruned_codes(channel_model, tmp_path) -> None:
    from tests.deploy.test_onnx import assert_matches_simulation, dq_codes

    path = lowbit.export(channel_model, tmp_path / "m.onnx", input_shape=(1, IMAGE_SIZE, IMAGE_SIZE))
    assert_matches_simulation(channel_model, path, calib_tensor(64, seed=3))
    import onnx

    stored = dq_codes(onnx.load(str(path)))
    for name, widths in CHANNEL_WIDTHS.items():
        _, codes = stored[name]
        for c, b in enumerate(widths):
            limit = 0 if b == 0 else 1 if b == 1 else 2 ** (b - 1) - 1
            assert np.abs(codes[c]).max() <= limit, (name, c)
        assert all(not codes[c].any() for c, b in enumerate(widths) if b == 0)


def test_channel_widths_integer_path(channel_model) -> None:
    res = integer_agreement(channel_model, calib_tensor(32, seed=7), integer_model(channel_model, bias_frac_bits=16))
    assert res["argmax_agreement"] == 100.0, res
    assert res["code_agreement"] >= 99.8, res


def test_parse_cli_channel_entries() -> None:
    from lowbit.layer_bits import ChannelBits, check_layer_bits

    assert parse_cli_entry("conv1=[8,8,4,0]") == ("conv1", ChannelBits((8, 8, 4, 0)))
    assert parse_cli_entry("conv1=[1, 0],8") == ("conv1", (ChannelBits((1, 0)), 8))
    assert parse_cli_entry("conv1=[4,0,2],fp") == ("conv1", (ChannelBits((4, 0, 2)), None))
    for bad in ("c=[4,x]", "c=[4,17]", "c=[0,0]", "c=[4,4", "c=[4,4]x", "c=[4,4],0"):
        with pytest.raises(LowbitError):
            parse_cli_entry(bad)
    # JSON (--layer-bits-file): a list of other than two widths is per channel, [[...], a] the pair
    data = json.loads('{"a": [8, 8, 4, 0], "b": [[1, 0], null], "c": [4, 8]}')
    assert check_layer_bits(data) == {"a": ChannelBits((8, 8, 4, 0)), "b": (ChannelBits((1, 0)), None), "c": (4, 8)}


def test_summary_counts_pruned_channels(channel_model) -> None:
    pruned = sum(b == 0 for widths in CHANNEL_WIDTHS.values() for b in widths)
    assert lowbit.summary(channel_model).totals["pruned_channels"] == pruned
