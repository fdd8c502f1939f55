"""Per-channel widths are packed densely (artifact version 5): the file holds each channel's codes at
its own width, pruned channels none, and its size is the theory's (weights at their widths + scales),
which ``deploy.size`` and ``lowbit.summary`` report from the specs alone."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.deploy.artifact import codes_key
from lowbit.deploy.size import quantized_bytes
from lowbit.quant.layers import quant_layers
from tests.conftest import calib_tensor, make_model
from tests.deploy.test_artifact import data_bytes, raw_header

# tiny ResNet-20 (4/8/16 channels per stage): every width 0..8 somewhere, per-layer widths beside them
CHANNEL_MAP = {
    "layers.0.0.conv1": [4, 2, 0, 1], "layers.0.1.conv2": [8, 3, 3, 0],
    "layers.1.0.conv1": [3, 3, 2, 8, 1, 1, 0, 4], "layers.1.1.conv2": [2, 2, 2, 2, 0, 0, 5, 6],
    "layers.2.0.conv2": [8, 0] * 8, "layers.2.2.conv1": [1, 2, 3, 4] * 4, "layers.2.1.conv1": 3, "fc": 6,
}


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_channel_widths_file_is_the_theoretical_size(symmetric, tmp_path) -> None:
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=4, a_bits=4, w_symmetric=symmetric,
                        layer_bits=CHANNEL_MAP)
    path = lowbit.export(q, tmp_path / "m.lowbit")
    layers = dict(quant_layers(q))
    # the theory, from the map and the weight shapes: every channel's weights at its width (in bits,
    # not rounded), a float32 scale per channel (and a zero point per unpruned one when asymmetric)
    theory_bits = 0
    runs: dict[int, int] = {}  # bytes of every codes<b> blob as the layout says: one byte-aligned run per layer and width
    runs_count = 0
    widths_of = {n: lowbit.record_of(q).layer_bits[n] for n in layers}
    for name, layer in layers.items():
        bits = widths_of[name]
        if not bits.enabled:
            continue
        out = layer.weight.shape[0]
        widths = bits.channel_bits or (bits.w_bits,) * out
        per_channel = layer.weight[0].numel()
        theory_bits += per_channel * sum(widths) + 32 * out + (0 if symmetric else 32 * sum(b > 0 for b in widths))
        for b in sorted(set(widths) - {0}):
            runs[b] = runs.get(b, 0) + math.ceil(per_channel * widths.count(b) * b / 8)
            runs_count += 1
    weight_bytes = theory_bits / 8
    with safe_open(str(path), framework="pt") as f:
        blobs = {k: f.get_tensor(k).numel() for k in f.keys() if k.startswith("codes")}
        params = f.get_tensor("params").numel()
    assert blobs == {codes_key(b): n for b, n in runs.items()}  # each channel at its own width, pruned: nothing
    state = q.state_dict()
    layer_state = {k for k in state if ".weight_quant." in k or ".input_quant." in k
                   or k.rpartition(".")[::2] in {(n, t) for n in layers for t in ("weight", "bias")}}
    others = sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for k, v in state.items()
                 if k not in layer_state)
    inputs = 8 * sum(1 for n, b in widths_of.items() if b.a_bits is not None)
    biases = 4 * sum(l.bias.numel() for l in layers.values() if l.bias is not None)
    written = sum(blobs.values()) + 4 * params - biases - inputs  # codes + scales + zero points as written
    assert weight_bytes <= written <= weight_bytes + runs_count  # at most one padding byte per run
    assert written <= 1.05 * weight_bytes
    # deploy.size and lowbit.summary count what is written, from the specs
    totals = lowbit.summary(q).totals
    assert totals["weight_bytes"] == written and totals["model_bytes"] == quantized_bytes(q) == data_bytes(path)
    assert data_bytes(path) == written + biases + inputs + others
    assert totals["pruned_channels"] == sum(w.count(0) for w in CHANNEL_MAP.values() if isinstance(w, list))
    # the file: the tensor data plus a header bounded by the layers and channels it describes
    header, content = raw_header(path)
    manifest = json.loads(content["__metadata__"]["manifest"])
    names = [r[0] for r in manifest["layers"]]
    for name, widths in CHANNEL_MAP.items():  # the widths once, one character per channel
        if isinstance(widths, list):
            assert manifest["group_bits"][name] == "".join(str(b) for b in widths)
            assert manifest["layer_bits"][names.index(name)][2] == 1  # "the row's group_bits"
    channels = sum(len(w) for w in CHANNEL_MAP.values() if isinstance(w, list))
    assert header < 1024 + 150 * len(layers) + 2 * channels
    # and it loads to the same model
    images = calib_tensor(8, seed=4)
    with torch.no_grad():
        assert torch.equal(lowbit.load(path, model=make_model("resnet20"))(images), q(images))


@pytest.mark.parametrize("kind", ["convtranspose2d-grouped", "conv1d-linear"])
def test_other_layer_kinds_round_trip_at_their_size(kind, tmp_path) -> None:
    """Channel axis 1 (ConvTranspose, grouped), 1-D convs, Linear: every channel at its own width."""
    from tests import layer_kind_models as kinds

    fp, x = ((kinds.make(kinds.DecoderClassifier), kinds.images(16)) if kind.startswith("convtranspose")
             else (kinds.make(kinds.Net1d), kinds.signals(16)))
    channels = {n: l.weight_quant.channels for n, l in quant_layers(lowbit.quantize(fp, x, w_bits=4, a_bits=4))}
    widths = (0, 1, 2, 3, 4, 8)
    layer_bits = {n: [widths[(c + i) % 6] or (3 if c == 0 else 0) for c in range(k)]
                  for i, (n, k) in enumerate(channels.items())}
    q = lowbit.quantize(fp, x, w_bits=4, a_bits=4, layer_bits=layer_bits)
    path = lowbit.export(q, tmp_path / "m.lowbit")
    assert data_bytes(path) == quantized_bytes(q)
    with torch.no_grad():
        assert torch.equal(lowbit.load(path, model=fp)(x), q(x))
