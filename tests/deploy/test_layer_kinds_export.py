"""Conv1d, ConvTranspose2d and subclasses with their own forward through every deployment path:
the packed artifact, ONNX QDQ (parity with ONNX Runtime) and the integer-only reference."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors import safe_open
from safetensors.torch import save_file

import lowbit
from lowbit import LowbitError
from lowbit.deploy.integer import integer_agreement, integer_model, with_int32_bias
from lowbit.deploy.onnx_qdq import build_onnx, onnx_session
from lowbit.deploy.size import size_report
from lowbit.quant.layers import quant_layers
from tests.conftest import calib_tensor, make_model
from tests.layer_kind_models import Decoder, FloatKindsNet, Net1d, SubclassNet, images, make, signals

pytestmark = pytest.mark.torch_export  # lowbit's default ONNX exporter (tests/conftest.py)

NETS = {"conv1d": (Net1d, signals), "deconv": (Decoder, images), "subclass": (SubclassNet, images)}
CASES = {  # name -> quantize options
    "W4A4": {"w_bits": 4, "a_bits": 4},
    "W2A4-bitsplit": {"w_bits": 2, "a_bits": 4, "method": "bitsplit", "iters": 1, "samples": 2048},
    "W4A4-asym-groups": {"w_bits": 4, "a_bits": 4, "method": "mse", "candidates": 20, "w_symmetric": False,
                         "granularity": "group", "groups": 2},
    "W8A8-all": {"w_bits": 8, "a_bits": 8, "quantize_all": True},
}


def _quantized(net: str, case: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """FP model, its quantized simulation (checked to hold the layer kinds of interest), test inputs."""
    cls, data = NETS[net]
    model = make(cls)
    options = dict(CASES[case])
    q = lowbit.quantize(model, data(24), method=options.pop("method", "minmax"), **options)
    kinds = _kinds_present(q)
    if net == "conv1d":
        assert "QuantConv1d" in kinds
    elif net == "deconv":
        assert "QuantConvTranspose2d" in kinds
    else:  # subclasses with their own forward stay instances of their classes
        assert all(isinstance(getattr(q, n), type(getattr(model, n))) for n in ("a", "b", "fc"))
    return model, q, data(16, seed=5)


def _run(q: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return q(x)


def _ort(path: Path | bytes, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(onnx_session(path).run(None, {"input": x.numpy()})[0])


def _kinds_present(q: torch.nn.Module) -> set[str]:
    return {type(l).__name__ for _, l in quant_layers(q)}


# ------------------------------------------------------------------------------ artifact
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("net", sorted(NETS))
def test_artifact_round_trip_is_identical(net, case, tmp_path) -> None:
    model, q, x = _quantized(net, case)
    path = lowbit.export(q, tmp_path / "m.lowbit")
    loaded = lowbit.load(path, model=model)
    assert torch.equal(_run(loaded, x), _run(q, x))
    assert _kinds_present(loaded) == _kinds_present(q)
    for (_, a), (_, b) in zip(quant_layers(q), quant_layers(loaded)):
        assert a.weight_quant.axis == b.weight_quant.axis and a.role == b.role
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["manifest"])
    rows = {r[0]: dict(zip(manifest["fields"], r)) for r in manifest["layers"]}
    if net == "deconv":
        assert rows["up2"]["kind"] == "convtranspose2d" and rows["up2"]["shape"] == [8, 3, 4, 4]
        assert rows["up2"]["out"] == 6  # bias length: out_channels, not shape[0]
    if net == "conv1d":
        assert rows["c1"]["kind"] == "conv1d" and rows["c1"]["shape"] == [8, 2, 5]


def test_artifacts_without_kinds_still_load(tmp_path) -> None:
    """Files written before the kind / out columns existed (Conv2d and Linear only) load as before."""
    model = make_model("resnet20")
    q = lowbit.quantize(model, calib_tensor(16), w_bits=4, a_bits=4)
    path = lowbit.export(q, tmp_path / "m.lowbit")
    old = _rewrite_manifest(path, tmp_path / "old.lowbit", lambda m: {
        **m, "fields": m["fields"][:-2], "layers": [r[:-2] for r in m["layers"]]})
    assert torch.equal(_run(lowbit.load(old, model=model), calib_tensor(4)), _run(q, calib_tensor(4)))


def test_artifact_kind_must_match_the_model(tmp_path) -> None:
    model, q, _ = _quantized("deconv", "W4A4")
    path = lowbit.export(q, tmp_path / "m.lowbit")

    def retag(kind, out=None):
        def change(m):
            col = m["fields"].index("kind")
            rows = [list(r) for r in m["layers"]]
            for r in rows:
                if r[0] == "up1":
                    r[col] = kind
                    if out is not None:
                        r[col + 1] = out
            return {**m, "layers": rows}
        return change

    for i, (change, message) in enumerate([(retag("conv2d"), "the artifact holds a conv2d layer"),
                                           (retag("conv2d", 4), "output channels that fit a conv2d weight"),
                                           (retag("conv3d"), "kind must be one of"),
                                           (retag("convtranspose2d", 7), "output channels that fit a convtranspose2d"),
                                           (retag("convtranspose2d", "8"), "out must be a positive integer")]):
        bad = _rewrite_manifest(path, tmp_path / f"bad{i}.lowbit", change)
        with pytest.raises(LowbitError, match=message):
            lowbit.load(bad, model=model)


def _rewrite_manifest(path: Path, out: Path, change) -> Path:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), metadata={**meta, "manifest": json.dumps(change(json.loads(meta["manifest"])))})
    return out


# ------------------------------------------------------------------------------ ONNX
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("net", sorted(NETS))
def test_onnx_runtime_reproduces_the_simulation(net, case, tmp_path, monkeypatch) -> None:
    if case != "W4A4":
        # the layer kinds go through torch.export in the W4A4 case; the other cases vary only what the
        # QDQ rewrite writes (widths, zero points, groups, quantized input), which both exporters'
        # graphs receive alike, so they take the TorchScript one (3-5x faster here)
        from lowbit.deploy import onnx_qdq
        monkeypatch.setattr(onnx_qdq, "DEFAULT_EXPORTER", "torchscript")
    _, q, x = _quantized(net, case)
    path = lowbit.export(q, tmp_path / "m.onnx")
    _assert_matches(_run(q, x), _ort(path, x))
    # int32 biases: the graph matches the simulation with int32-rounded biases
    path32 = lowbit.export(q, tmp_path / "m32.onnx", int32_bias=True)
    _assert_matches(_run(with_int32_bias(q), x), _ort(path32, x))


def _assert_matches(sim: torch.Tensor, ort: torch.Tensor) -> None:
    """As tests/deploy/test_onnx.py checks: float sums run in other orders in ONNX Runtime, so a value
    on a rounding boundary may now and then take the neighbouring code; almost every output is equal."""
    diff = (sim - ort).abs().flatten()
    scale = sim.abs().max()
    assert diff.median() <= 1e-5 * scale
    assert (diff <= 1e-4 * scale).float().mean() >= 0.95
    assert (sim.flatten(1).argmax(1) == ort.flatten(1).argmax(1)).float().mean() >= 0.9


def test_onnx_graph_uses_conv_with_1d_kernels_and_convtranspose_with_axis_1() -> None:
    _, q1, _ = _quantized("conv1d", "W4A4")
    _, q2, _ = _quantized("deconv", "W4A4")
    for q, op, axis, ndim in ((q1, "Conv", 0, 3), (q2, "ConvTranspose", 1, 4)):
        model = build_onnx(q)
        inits = {t.name: t for t in model.graph.initializer}
        nodes = [n for n in model.graph.node if n.op_type == op]
        assert nodes
        for node in nodes:
            dq = next(n for n in model.graph.node if node.input[1] in n.output)
            assert dq.op_type == "DequantizeLinear"
            codes = numpy_helper.to_array(inits[dq.input[0]])
            assert codes.ndim == ndim
            attrs = {a.name: a.i for a in dq.attribute}
            scales = numpy_helper.to_array(inits[dq.input[1]])
            if scales.size > 1:
                assert attrs["axis"] == axis and scales.size == codes.shape[axis]
            if op == "Conv":
                kernel = next(a.ints for a in node.attribute if a.name == "kernel_shape")
                assert len(kernel) == 1
    layer = q2.up2  # ConvTranspose2d(8, 6, groups=2): weight (8, 3, 4, 4), scales along dim 1
    model = build_onnx(q2)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_allclose(init["up2.weight_scale"], layer.weight_quant.scale.numpy())
    np.testing.assert_array_equal(init["up2.weight_q"], layer.weight_quant.quantize(layer.weight.detach()).int_value)


def test_onnx_example_input_for_conv1d_models(tmp_path) -> None:
    """The recorded (C, L) calibration shape gets its batch dimension (it is not an image)."""
    _, q, x = _quantized("conv1d", "W4A4")
    lowbit.record_of(q).input_shape = None
    path = lowbit.export(q, tmp_path / "m.onnx", input_shape=(2, 32))
    assert torch.allclose(_ort(path, x), _run(q, x), atol=1e-4)


# ------------------------------------------------------------------------------ integer path
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("net", sorted(NETS))
def test_integer_path_agrees_with_the_simulation(net, case) -> None:
    _, q, x = _quantized(net, case)
    device = integer_model(q)
    layers = dict(quant_layers(q))
    custom = {n for n, l in layers.items() if l.custom_forward}
    assert set(device.layers) == set(layers) - custom  # own forwards run as in the simulation
    assert set(device.integer_layers) == {n for n, l in layers.items() if l.input_quant.enabled} - custom
    res = integer_agreement(with_int32_bias(q), x, device)
    # float accumulation order differs between the two paths (oneDNN picks kernels per CPU): on an
    # AVX2-only host one ConvTranspose code in ~10^5 lands on its neighbour
    assert res["code_agreement"] >= 99.99 and res["argmax_agreement"] == 100.0
    exact = res["code_agreement"] == 100.0  # a flipped code moves what follows it by about one step
    assert res["max_abs_diff"] <= (1e-4 if exact else 1e-2) * _run(q, x).abs().max().item()
    assert res["fits_int32"]
    res16 = integer_agreement(q, x, integer_model(q, bias_frac_bits=16))
    assert res16["code_agreement"] == 100.0 and res16["argmax_agreement"] == 100.0
    if net == "deconv":
        # conv -> BN -> ReLU -> deconv chains requantize in fixed point, deconvs included
        assert {"up1", "up2"} <= set(device.requantized)
        assert {type(device.layers[n]).__name__ for n in ("up1", "up2", "up3")} == {"IntegerConvTranspose2d"}
    if net == "conv1d":
        assert type(device.layers["c2"]).__name__ == "IntegerConv1d" and "c2" in device.requantized


# ------------------------------------------------------------------------------ float kinds
def test_layers_left_in_float_export_everywhere(tmp_path) -> None:
    model = make(FloatKindsNet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float-layer warning is tested in tests/quant
        q = lowbit.quantize(model, images(8), w_bits=4, a_bits=4)
        loaded = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), model=model)
    x = images(4, seed=3)
    assert torch.equal(_run(loaded, x), _run(q, x))
    assert torch.allclose(_ort(lowbit.export(q, tmp_path / "m.onnx"), x), _run(q, x), atol=1e-4)
    assert integer_agreement(q, x)["argmax_agreement"] == 100.0
    assert size_report(model, loaded)["float_layers"] == ["v", "t1"]  # and counted as float after loading
