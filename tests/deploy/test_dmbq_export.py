"""Export of DMBQ models: packed sign planes + alphas round trip, pruned channels free, ONNX parity."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.deploy.multibit import multibit_onnx_ops
from lowbit.deploy.onnx_qdq import onnx_session
from lowbit.errors import LowbitError
from lowbit.quant.dmbq_quantizers import DmbqAct, DmbqWeight
from lowbit.quant.layers import quant_layers

from ..conftest import calib_tensor, make_model


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
        assert f.get_tensor("planes").numel() == expected
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


def test_a_damaged_multibit_artifact_is_refused(trained, tmp_path):
    fp, q, _ = trained
    path = lowbit.export(q, tmp_path / "m.lowbit")
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["planes"] = tensors["planes"][:-1]
    bad = tmp_path / "bad.lowbit"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(LowbitError, match="planes"):
        lowbit.load(bad, model=fp)


def test_integer_reference_is_refused_with_a_reason(trained):
    _, q, _ = trained
    with pytest.raises(LowbitError, match="integer grid"):
        lowbit.integer_model(q)
