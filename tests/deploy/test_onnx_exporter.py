"""The ONNX exporter behind ``lowbit.export``: torch.export, not the deprecated TorchScript tracer.

The graph is captured with ``torch.export`` and translated by torch's ``torch.export``-based ONNX
exporter; only a model that torch.export cannot capture (data-dependent Python control flow)
falls back to the TorchScript exporter, with a warning that says so.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import lowbit
from lowbit.deploy.onnx_qdq import MARK_DOMAIN, build_onnx, onnx_session
from tests.conftest import IMAGE_SIZE, calib_tensor, make_model

SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
pytestmark = pytest.mark.torch_export  # lowbit's default exporter, whatever the suite's default (tests/conftest.py)


@pytest.fixture(scope="module")
def q4() -> torch.nn.Module:
    return lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=4, a_bits=4, method="minmax")


def _no_torchscript_tracer(*args, **kwargs):  # noqa: ANN002, ANN003
    raise AssertionError("the TorchScript tracer (torch.jit._get_trace_graph) was used")


def test_export_uses_torch_export_and_warns_nothing(q4, monkeypatch) -> None:
    """No TorchScript tracing, and no warning of any kind (none is recorded and dropped either)."""
    monkeypatch.setattr(torch.jit, "_get_trace_graph", _no_torchscript_tracer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_onnx(q4, input_shape=SHAPE)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert model.opset_import[0].version == 21 and len(model.opset_import) == 1
    assert all(node.domain != MARK_DOMAIN for node in model.graph.node)


def _producer(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def test_qdq_structure_around_every_layer(q4) -> None:
    """Each quantized Conv / Gemm takes DequantizeLinear(weight codes at their width) and, where its
    input is quantized, [Clip ->] QuantizeLinear -> DequantizeLinear; the batch stays dynamic."""
    from lowbit.quant.layers import quant_layers

    model = build_onnx(q4, input_shape=SHAPE)
    producer = _producer(model)
    inits = {t.name: t for t in model.graph.initializer}
    layers = dict(quant_layers(q4))
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == len(layers)
    for node in convs:
        w_dq = producer[node.input[1]]
        name = w_dq.input[0][: -len(".weight_q")]
        layer = layers[name]
        assert w_dq.op_type == "DequantizeLinear" and w_dq.input[0] == f"{name}.weight_q"
        bits = layer.weight_quant.bits
        # 8-bit codes feeding an 8-bit input are shifted into UINT8 when they could saturate ORT's U8S8 kernels
        allowed = {TensorProto.INT4} if bits <= 4 else {TensorProto.INT8, TensorProto.UINT8}
        assert inits[w_dq.input[0]].data_type in allowed
        if not layer.input_quant.enabled:
            continue
        x_dq = producer[node.input[0]]
        q = producer[x_dq.input[0]]
        assert (x_dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
        assert x_dq.name == f"{name}.input_dq" and inits[q.input[2]].data_type in (TensorProto.UINT8, TensorProto.INT8)
        clipped = q.input[0] in producer and producer[q.input[0]].op_type == "Clip"
        assert clipped == (layer.input_quant.bits < 8)
    assert sum(layers[n].weight_quant.bits == 4 for n in layers) >= len(layers) - 2
    for value in (model.graph.input[0], model.graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_any_batch_size_and_same_results_as_the_torchscript_exporter(q4, tmp_path) -> None:
    """ONNX Runtime gives the simulation's logits at batch sizes 1 and 5, exactly as the old exporter's graph."""
    from lowbit.deploy.onnx_qdq import _marked_copy, _rewrite_markers, _torchscript_export, collect_specs

    path = lowbit.export(q4, tmp_path / "m.onnx", input_shape=SHAPE)
    session = onnx_session(path)
    images = calib_tensor(5, seed=3)
    with torch.no_grad():
        sim = q4(images)
    for batch in (images[:1], images):
        out = torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])
        assert torch.equal(out.argmax(1), sim[: len(batch)].argmax(1))
        assert (out - sim[: len(batch)]).abs().max() <= 1e-4 * sim.abs().max()
    # the same graph through the TorchScript exporter (the fallback): the same numbers
    weights, inputs = collect_specs(q4)
    with pytest.warns(UserWarning, match="TorchScript exporter"):
        legacy = _torchscript_export(_marked_copy(q4, weights, inputs), torch.zeros((1,) + SHAPE), 20, "test")
    legacy = onnx.version_converter.convert_version(legacy, 21)
    _rewrite_markers(legacy, weights, inputs)
    old = onnx_session(legacy.SerializeToString()).run(None, {"input": images.numpy()})[0]
    new = session.run(None, {"input": images.numpy()})[0]
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-5 * np.abs(old).max())


@pytest.mark.parametrize("w_bits, opset", [(8, 18), (2, 25)])
def test_default_opsets(w_bits, opset, tmp_path) -> None:
    """torch writes opset 18 (the 8-bit default); INT2 weights are converted up to opset 25."""
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=w_bits, a_bits=8 if w_bits == 8 else 4)
    path = lowbit.export(q, tmp_path / "m.onnx", input_shape=SHAPE)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == opset
    images = calib_tensor(8, seed=4)
    out = torch.from_numpy(onnx_session(path).run(None, {"input": images.numpy()})[0])
    with torch.no_grad():
        assert torch.equal(out.argmax(1), q(images).argmax(1))


def test_opset_below_18_comes_from_the_torchscript_exporter(tmp_path) -> None:
    """onnx.version_converter cannot lower torch's opset-18 graph (no Add 14 -> 13 adapter): an explicit
    opset 13 is written by the TorchScript exporter, and the warning says why."""
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=8, a_bits=8)
    with pytest.warns(UserWarning, match="writes opset 18 or newer, not 13.*TorchScript exporter"):
        path = lowbit.export(q, tmp_path / "m.onnx", input_shape=SHAPE, opset=13)
    assert onnx.load(str(path)).opset_import[0].version == 13
    images = calib_tensor(8, seed=6)
    out = torch.from_numpy(onnx_session(path).run(None, {"input": images.numpy()})[0])
    with torch.no_grad():
        assert torch.equal(out.argmax(1), q(images).argmax(1))


def test_fallback_for_data_dependent_control_flow(tmp_path) -> None:
    """torch.export cannot capture ``if x.sum() > 0``: the TorchScript exporter records the example's
    branch, and the warning names the reason; the exporter's own deprecation notice is not repeated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BN folding's own notice that torch.fx cannot trace the model
        q = lowbit.quantize(make_model("untraceable"), calib_tensor(16), w_bits=4, a_bits=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = lowbit.export(q, tmp_path / "u.onnx", input_shape=SHAPE)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and caught[0].category is UserWarning, messages
    assert "torch.export cannot capture it" in messages[0] and "TorchScript exporter" in messages[0]
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    images = calib_tensor(8, seed=5)
    with torch.no_grad():
        sim = q(images)
    out = torch.from_numpy(onnx_session(path).run(None, {"input": images.numpy()})[0])
    assert torch.equal(out.argmax(1), sim.argmax(1))


def test_exporter_option(q4, tmp_path) -> None:
    """``exporter="torchscript"`` asks for the old exporter (no warning, same QDQ rewrite); others are refused."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = lowbit.export(q4, tmp_path / "ts.onnx", input_shape=SHAPE, exporter="torchscript")
    assert [str(w.message) for w in caught] == []
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 21
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) >= 40
    with pytest.raises(lowbit.LowbitError, match="exporter"):
        lowbit.export(q4, tmp_path / "bad.onnx", input_shape=SHAPE, exporter="dynamo")
    assert not (tmp_path / "bad.onnx").exists()
