"""Pruned (0-bit) output channels leave the ONNX graph where that is exact (deploy.onnx_prune)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.deploy.onnx_qdq import build_onnx, onnx_parity, onnx_predict, onnx_session

CH = 6


class Chain(nn.Module):
    """conv ``a`` -> ReLU -> ``mid`` (plain, depthwise or residual) -> ReLU -> 1x1 conv ``c`` -> head."""

    def __init__(self, mid: str, pad: int = 1) -> None:
        super().__init__()
        self.mid_kind = mid
        self.a = nn.Conv2d(1, CH, 3, padding=1)
        if mid == "depthwise":
            self.b = nn.Conv2d(CH, CH, 3, padding=pad, groups=CH)
        else:
            self.b = nn.Conv2d(CH, CH, 3 if pad else 1, padding=pad)
        self.c = nn.Conv2d(CH, 4, 1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():  # channel 0: negative bias (ReLU -> 0); channel 1: positive (a nonzero constant)
            self.a.bias.copy_(torch.tensor([-2.0, 1.5, 0.1, 0.2, -0.1, 0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        z = torch.relu(self.b(y))
        if self.mid_kind == "residual":
            z = z + y
        return self.fc(torch.relu(self.c(z)).mean((2, 3)))


def quantized(mid: str, pad: int = 1):
    torch.manual_seed(0)
    fp = Chain(mid, pad).eval()
    widths = [0, 0, 4, 8, 2, 3]  # channels 0 and 1 pruned
    return lowbit.quantize(fp, torch.randn(32, 1, 12, 12), w_bits=8, a_bits=8, progress=False,
                           layer_bits={"a": widths, "fc": None})


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith(".weight_q")}


def pruned_meta(model) -> dict:
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "lowbit"))
    return meta["layers"]["a"]["weight"]["pruned_channels"]


def run_both(q):
    x = torch.randn(24, 1, 12, 12)
    kept, dropped = build_onnx(q, drop_pruned=False), build_onnx(q)
    out_kept = onnx_predict(onnx_session(kept.SerializeToString()), x)
    out_dropped = onnx_predict(onnx_session(dropped.SerializeToString()), x)
    return x, kept, dropped, out_kept, out_dropped


@pytest.mark.parametrize("mid, pad, removed, folded", [
    ("plain", 0, 2, 1),      # 1x1 consumer without padding: channel 1's constant folds into its bias
    ("plain", 1, 1, 0),      # 3x3 padded consumer: only channel 0 (constant 0 after ReLU) is exact to drop
    ("depthwise", 1, 1, 1),  # padded depthwise: channel 0 (the depthwise gives its bias there, folded into c)
    ("depthwise", 0, 2, 2),  # unpadded depthwise: both, their (nonzero) depthwise outputs folded into c
])
def test_pruned_channels_leave_the_graph_where_exact(mid, pad, removed, folded) -> None:
    q = quantized(mid, pad)
    x, kept, dropped, out_kept, out_dropped = run_both(q)
    assert pruned_meta(dropped) == {"pruned": 2, "removed": removed, "folded": folded,
                                    **({"kept": pruned_meta(dropped)["kept"]} if removed < 2 else {})}
    before, after = weights(kept), weights(dropped)
    assert before["a.weight_q"].shape[0] == CH and after["a.weight_q"].shape[0] == CH - removed
    if mid == "depthwise":  # the depthwise conv loses its channel(s) as well, and its group count with them
        assert after["b.weight_q"].shape[0] == CH - removed and after["c.weight_q"].shape[1] == CH - removed
        conv = next(n for n in dropped.graph.node if n.op_type == "Conv" and "b.weight_dq" in n.input[1])
        assert next(a.i for a in conv.attribute if a.name == "group") == CH - removed
    else:
        assert after["b.weight_q"].shape[1] == CH - removed
    assert sum(v.size for v in after.values()) < sum(v.size for v in before.values())
    # same function as the graph that keeps the zero codes (float summation order aside), and the simulation's
    torch.testing.assert_close(out_dropped, out_kept, rtol=1e-4, atol=1e-4)
    parity = onnx_parity(q, onnx_session(dropped.SerializeToString()), x)
    assert parity["argmax_agreement"] == 100.0 and parity["max_abs_diff"] < 1e-3


def test_residual_add_keeps_the_channels() -> None:
    """A channel that also feeds a residual add is needed there: it stays, as zero codes."""
    q = quantized("residual")
    _, kept, dropped, out_kept, out_dropped = run_both(q)
    row = pruned_meta(dropped)
    assert row["removed"] == 0 and row["kept"] == "used by Add"
    assert weights(dropped)["a.weight_q"].shape == weights(kept)["a.weight_q"].shape
    torch.testing.assert_close(out_dropped, out_kept, rtol=0, atol=0)


def test_int32_bias_consumer_is_not_folded_into() -> None:
    """An int32 bias cannot take a float constant exactly: only the zero-constant channel goes."""
    q = quantized("plain", pad=0)
    model = build_onnx(q, int32_bias=True)
    row = pruned_meta(model)
    assert row["removed"] == 1 and row["folded"] == 0 and "int32" in row["kept"]
    assert weights(model)["b.weight_q"].shape[1] == CH - 1
    reference = build_onnx(q, int32_bias=True, drop_pruned=False)
    x = torch.randn(8, 1, 12, 12)
    torch.testing.assert_close(onnx_predict(onnx_session(model.SerializeToString()), x),
                               onnx_predict(onnx_session(reference.SerializeToString()), x), rtol=1e-4, atol=1e-4)


def test_lowbit_export_removes_them_and_load_refuses_nothing(tmp_path) -> None:
    """``lowbit.export`` writes the shrunk graph; the ``.lowbit`` artifact keeps every channel (0 bits)."""
    q = quantized("plain", pad=0)
    path = lowbit.export(q, tmp_path / "m.onnx")
    import onnx

    assert weights(onnx.load(str(path)))["a.weight_q"].shape[0] == CH - 2
    back = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), model=Chain("plain", 0))
    x = torch.randn(8, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
