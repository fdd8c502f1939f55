"""Sparse activation thresholds (TSQ) through the artifact, ONNX and the integer path, on a PTQ model."""
from __future__ import annotations

import json

import pytest
import torch

import lowbit

from lowbit.errors import LowbitError
from lowbit.quant.layers import quant_layers
from lowbit.quant.sparse import SparseActQuantizer
from tests.conftest import calib_tensor, make_model


def sparse_model(name: str = "resnet20", bits: int = 4):
    """MinMax PTQ with every unsigned body input made sparse at 1.3 steps (the first level mostly zeroed)."""
    fp = make_model(name)
    q = lowbit.quantize(fp, calib_tensor(16), w_bits=bits, a_bits=bits, progress=False)
    made = []
    for n, layer in quant_layers(q):
        aq = layer.input_quant
        if layer.role == "body" and aq.enabled and not aq.signed and aq.zero_point.item() == 0:
            layer.input_quant = SparseActQuantizer.from_quantizer(aq, 1.3 * aq.scale.item())
            made.append(n)
    assert made
    return fp, q, made


def test_thresholds_count_in_the_theoretical_size(tmp_path) -> None:
    """A sparse input stores its threshold next to its scale and zero point: the size counts it."""
    from lowbit.deploy.size import quantized_bytes
    from tests.deploy.test_artifact import data_bytes

    fp, q, made = sparse_model()
    path = lowbit.export(q, tmp_path / "m.lowbit")
    plain = lowbit.quantize(fp, calib_tensor(16), w_bits=4, a_bits=4, progress=False)
    assert data_bytes(path) == quantized_bytes(q) == quantized_bytes(plain) + 4 * len(made)


def _rewrite(path, tmp_path, edit) -> str:
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    manifest = json.loads(meta["manifest"])
    edit(manifest, tensors)
    meta["manifest"] = json.dumps(manifest)
    out = tmp_path / "edited.lowbit"
    save_file(tensors, str(out), metadata=meta)
    return str(out)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_sparse_round_trips(name: str, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from lowbit.deploy.integer import integer_agreement, integer_model, with_int32_bias
    from tests.deploy.test_onnx import assert_matches_simulation

    fp, q, made = sparse_model(name)
    x = calib_tensor(32, seed=3)
    plain = lowbit.quantize(fp, calib_tensor(16), w_bits=4, a_bits=4, progress=False)
    with torch.no_grad():
        assert not torch.equal(q(x), plain(x))  # the thresholds change the codes
    path = lowbit.export(q, tmp_path / "m.lowbit")
    loaded = lowbit.load(path, model=fp)
    assert [n for n, l in quant_layers(loaded) if isinstance(l.input_quant, SparseActQuantizer)] == made
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    onnx_path = lowbit.export(loaded, tmp_path / "m.onnx")
    # one gate per sparse input; the torch.export path merges identical gates on a shared input
    # (a stage's conv1 and its downsample shortcut read the same tensor with the same threshold)
    wheres = [n.op_type for n in onnx.load(str(onnx_path)).graph.node].count("Where")
    assert 0 < wheres <= len(made)
    assert_matches_simulation(q, onnx_path, x)
    device = integer_model(q)
    res = integer_agreement(with_int32_bias(q), x, device)
    assert res["argmax_agreement"] == 100.0 and res["code_agreement"] >= 99.99, res
    if name == "resnet20":
        assert device.requantized  # conv -> ReLU -> sparse conv input requantizes on the accumulator


def test_tampered_thresholds_are_refused(tmp_path) -> None:
    fp, q, made = sparse_model()
    path = lowbit.export(q, tmp_path / "m.lowbit")
    key = f"{made[0]}.input_quant.threshold"

    def negative(m, t):
        t[key] = torch.tensor([-1.0])

    def unlisted(m, t):
        m["sparse_inputs"] = m["sparse_inputs"][1:]

    def missing(m, t):
        del t[key]

    def not_a_layer(m, t):
        m["sparse_inputs"] = m["sparse_inputs"] + ["nope"]

    for edit, match in ((negative, "threshold"), (unlisted, "does not list"), (missing, "missing"),
                        (not_a_layer, "quantized unsigned input")):
        with pytest.raises(LowbitError, match=match):
            lowbit.load(_rewrite(path, tmp_path, edit), model=fp)
