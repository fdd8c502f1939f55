"""Device moves (issue 14, item 13): quantize, load, export, the integer path and QAT on CUDA.

Tests marked ``cuda`` run only where ``torch.cuda.is_available()`` (conftest skips them
elsewhere). The first test needs no GPU: the ``meta`` device rejects mixing with CPU tensors
exactly as CUDA does, so it catches the same mismatches on any machine.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

import lowbit
from lowbit.deploy.artifact import load_artifact, read_artifact
from lowbit.deploy.integer import integer_agreement, integer_model
from lowbit.deploy.onnx_qdq import onnx_predict
from lowbit.quant.layers import quant_layers

from .conftest import TINY_METHOD_OPTIONS, calib_tensor, make_model
from .ptq.test_inplace_aliasing import ResidualInPlace  # x += 3 * conv(x): its scales once differed on CUDA

TINY = TINY_METHOD_OPTIONS


@pytest.fixture
def exact_cuda() -> Iterator[None]:
    """Full float32 on the GPU (no TF32), so CPU and CUDA results differ only by summation order."""
    matmul, conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = conv


def _all_on(model: nn.Module, kind: str) -> bool:
    return all(t.device.type == kind for t in list(model.parameters()) + list(model.buffers()))


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same function up to summation order: CPU and GPU sums differ in the last bits, which can
    move a few activations across a rounding boundary (one code step each), so allow 2% of the
    largest logit and one changed prediction in eight; a device bug is far larger than that."""
    close = (a - b).abs().max() <= 0.02 * b.abs().max().clamp_min(1e-12)
    same = (a.argmax(1) == b.argmax(1)).float().mean() >= 7 / 8
    return bool(close) and bool(same)


def test_load_builds_weights_on_the_target_device(tmp_path: Path) -> None:
    """Unpacked codes go to the device of the scales (the crash of ``load(device="cuda")``)."""
    fp = make_model("resnet20")
    q = lowbit.quantize(fp, calib_tensor(8), 4, 4)
    path = lowbit.export(q, tmp_path / "m.lowbit")
    with warnings.catch_warnings():  # loading values into meta tensors is a no-op torch warns about
        warnings.simplefilter("ignore", UserWarning)
        loaded = load_artifact(path, fp, device="meta")
    assert _all_on(loaded, "meta")


@pytest.mark.cuda
@pytest.mark.parametrize("method", sorted(TINY))
def test_quantize_on_cuda(method: str, tmp_path: Path, exact_cuda) -> None:
    fp, calib, images = make_model("zoofree"), calib_tensor(16), calib_tensor(8, seed=5)
    q = lowbit.quantize(fp, calib, 4, 4, method=method, device="cuda", **TINY[method])
    assert _all_on(q, "cuda")
    with torch.no_grad():
        out = q(images.cuda()).cpu()
    assert torch.isfinite(out).all()
    # the CUDA model's artifact, loaded on the CPU, computes the same function
    cpu = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), fp, device="cpu")
    with torch.no_grad():
        assert _agree(cpu(images), out)
    onnx_out = onnx_predict(lowbit.export(q, tmp_path / "m.onnx"), images)
    assert _agree(onnx_out, out)


@pytest.mark.cuda
def test_load_to_cuda_matches_cpu_load(tmp_path: Path, exact_cuda) -> None:
    fp, images = make_model("resnet20"), calib_tensor(8, seed=5)
    path = lowbit.export(lowbit.quantize(fp, calib_tensor(16), 4, 4, method="mse", candidates=10),
                         tmp_path / "m.lowbit")
    on_cpu = lowbit.load(path, fp, device="cpu")
    on_gpu = lowbit.load(path, fp, device="cuda")
    assert _all_on(on_gpu, "cuda")
    cpu_state, gpu_state = on_cpu.state_dict(), on_gpu.state_dict()
    assert cpu_state.keys() == gpu_state.keys()
    assert all(torch.equal(cpu_state[k], gpu_state[k].cpu()) for k in cpu_state)  # same integers, same scales
    with torch.no_grad():
        a, b = on_cpu(images), on_gpu(images.cuda()).cpu()
    assert _agree(b, a)


@pytest.mark.cuda
def test_export_from_cuda_model_equals_cpu_export(tmp_path: Path) -> None:
    q = lowbit.quantize(make_model("zoofree"), calib_tensor(16), 4, 4, method="mse", candidates=10)
    q_gpu = copy.deepcopy(q).to("cuda")
    manifest_cpu, tensors_cpu = read_artifact(lowbit.export(q, tmp_path / "cpu.lowbit"))
    manifest_gpu, tensors_gpu = read_artifact(lowbit.export(q_gpu, tmp_path / "gpu.lowbit"))
    assert manifest_cpu == manifest_gpu
    assert tensors_cpu.keys() == tensors_gpu.keys()
    assert all(torch.equal(tensors_cpu[k], tensors_gpu[k]) for k in tensors_cpu)
    import onnx
    from onnx import numpy_helper

    graphs = [onnx.load(str(lowbit.export(m, tmp_path / f"{n}.onnx"))).graph for n, m in (("cpu", q), ("gpu", q_gpu))]
    inits = [{t.name: numpy_helper.to_array(t) for t in g.initializer} for g in graphs]
    assert inits[0].keys() == inits[1].keys()
    assert all((inits[0][k] == inits[1][k]).all() for k in inits[0])
    assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]


@pytest.mark.cuda
def test_integer_path_on_cuda(exact_cuda) -> None:
    images = calib_tensor(8, seed=5)
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(16), 8, 8)
    q_gpu = copy.deepcopy(q).to("cuda")
    reference = integer_model(q)
    from_gpu = integer_model(q_gpu)  # built from a CUDA model: same integers, runs on the CPU
    with torch.no_grad():
        expected = reference(images)
        assert torch.equal(from_gpu(images), expected)
        on_gpu = integer_model(q).to("cuda")  # the integer reference itself on the GPU
        got = on_gpu(images.cuda())
    assert got.device.type == "cuda"
    assert _agree(got.cpu(), expected)
    # the agreement report works across devices and says what it says on the CPU
    on_cpu_report = integer_agreement(q, images, imodel=reference)
    report = integer_agreement(q_gpu, images, imodel=on_gpu)
    assert report["integer_layers"] == on_cpu_report["integer_layers"] > 0
    assert abs(report["code_agreement"] - on_cpu_report["code_agreement"]) < 1.0


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lsq", "gdrq"])
def test_qat_short_epoch_on_cuda(method: str, tmp_path: Path, exact_cuda) -> None:
    fp = make_model("resnet20")
    x = calib_tensor(16)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    q = lowbit.qat(fp, (x, y), method=method, w_bits=4, a_bits=4, epochs=1, batch_size=8, device="cuda",
                   log=lambda _: None)
    assert _all_on(q, "cuda")
    images = calib_tensor(8, seed=5)
    with torch.no_grad():
        out = q(images.cuda()).cpu()
    cpu = lowbit.load(lowbit.export(q, tmp_path / "qat.lowbit"), fp, device="cpu")
    with torch.no_grad():
        assert _agree(cpu(images), out)


@pytest.mark.cuda
@pytest.mark.parametrize("make", [lambda: make_model("zoofree"), lambda: make_model("resnet20"), ResidualInPlace])
def test_minmax_scales_match_between_cpu_and_cuda(make, exact_cuda) -> None:
    torch.manual_seed(0)
    fp, calib = make().eval(), calib_tensor(16)
    q_cpu = lowbit.quantize(fp, calib, 4, 4, method="minmax")
    q_gpu = lowbit.quantize(fp, calib, 4, 4, method="minmax", device="cuda")
    layers_gpu = dict(quant_layers(q_gpu))
    for name, layer in quant_layers(q_cpu):
        other = layers_gpu[name]
        assert torch.allclose(layer.weight_quant.scale, other.weight_quant.scale.cpu(), rtol=1e-6, atol=0), name
        assert torch.allclose(layer.input_quant.scale, other.input_quant.scale.cpu(), rtol=1e-3, atol=0), name
        # a zero point is a rounded ratio: a last-bit difference may move it by one at a tie
        assert (layer.input_quant.zero_point - other.input_quant.zero_point.cpu()).abs().max() <= 1, name
