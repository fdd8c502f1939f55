"""``lowbit.summary`` and ``lowbit inspect``: per-layer table and totals, computed independently here."""
from __future__ import annotations

import copy
import json

import pytest
from torch import nn

import lowbit
from lowbit import LowbitError
from lowbit.cli import main
from tests.conftest import calib_tensor, make_model

MAP = {"layers.0.*": 2, "layers.1.*": (3, 8), "layers.2.*.conv1": (8, None), "fc": None}


@pytest.fixture(scope="module")
def fp():
    return make_model("resnet20")


@pytest.fixture(scope="module")
def q(fp):
    return lowbit.quantize(fp, calib_tensor(16), w_bits=4, a_bits=4, layer_bits=MAP)


def expected_rows(fp: nn.Module) -> dict[str, tuple]:
    """(w_bits, a_bits, params, weight bytes) per layer, from the FP model's weights and the map by hand."""
    rows = {}
    for name, module in fp.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        n, out = module.weight.numel(), module.weight.shape[0]
        if name == "conv1":
            w, a = 8, None
        elif name == "fc":
            w, a = None, None
        elif name.startswith("layers.0."):
            w, a = 2, 4
        elif name.startswith("layers.1."):
            w, a = 3, 8
        elif name.startswith("layers.2.") and name.endswith("conv1"):
            w, a = 8, None
        else:
            w, a = 4, 4
        nbytes = n * 4 if w is None else -(-n * w // 8) + out * 4  # codes at w bits + one float32 scale per channel
        rows[name] = (w, a, n, nbytes)
    return rows


def test_table_and_totals(q, fp) -> None:
    s = lowbit.summary(q)
    want = expected_rows(fp)
    got = {r.name: (r.w_bits, r.a_bits, r.params, r.weight_bytes) for r in s.layers}
    assert got == want
    assert {r.name: r.role for r in s.layers}["conv1"] == "first" and {r.name: r.role for r in s.layers}["fc"] == "last"
    params = sum(v[2] for v in want.values())
    avg = sum(v[2] * (32 if v[0] is None else v[0]) for v in want.values()) / params
    quantized = [v for v in want.values() if v[0] is not None]
    avg_q = sum(v[2] * v[0] for v in quantized) / sum(v[2] for v in quantized)
    a = [v[1] for v in want.values() if v[1] is not None]
    t = s.totals
    assert t["avg_w_bits"] == pytest.approx(avg) and t["avg_w_bits_quantized"] == pytest.approx(avg_q)
    assert avg_q < avg  # the float fc counts as 32 bits in the first
    assert t["avg_a_bits"] == pytest.approx(sum(a) / len(a))
    assert t["weight_bytes"] == sum(v[3] for v in want.values())
    assert t["params"] == params and t["fp_layers"] == 1 and t["pruned_channels"] == 0
    assert t["model_bytes"] == lowbit.deploy.size.quantized_bytes(q)
    assert json.loads(s.to_json()) == s.to_dict()
    md = s.to_markdown()
    assert "| fc | linear | last | fp | fp |" in md and "| layers.0.0.conv1 | conv2d | body | 2 | 4 |" in md
    assert f"avg W bits {avg:.3f}" in md


def test_uniform_model_averages(fp) -> None:
    q = lowbit.quantize(fp, calib_tensor(8), w_bits=3, a_bits=None, quantize_all=True)
    t = lowbit.summary(q).totals
    assert t["avg_w_bits"] == t["avg_w_bits_quantized"] == 3.0 and t["avg_a_bits"] is None and t["fp_layers"] == 0


def test_summary_needs_a_quantized_model(fp) -> None:
    with pytest.raises(LowbitError, match="lowbit.quantize"):
        lowbit.summary(fp)


@pytest.mark.parametrize("stand_in", ["lsq-weight", "lsq-input", "dmbq-training"])
def test_mid_qat_model_is_a_clear_error(q, stand_in) -> None:
    """Training stand-ins declare no spec yet: summary and the size report name the layer, not an AttributeError."""
    from lowbit.quant.dmbq_quantizers import DmbqWeight
    from lowbit.quant.learnable import LearnedStepAct, LearnedStepWeight

    mid = copy.deepcopy(q)
    layer = mid.get_submodule("layers.2.0.conv2")
    if stand_in == "lsq-weight":
        layer.weight_quant = LearnedStepWeight(layer.weight_quant, layer.weight)
        match = "layers.2.0.conv2: its weight quantizer LearnedStepWeight declares no spec .a training stand-in"
    elif stand_in == "lsq-input":
        layer.input_quant = LearnedStepAct(layer.input_quant)
        match = "layers.2.0.conv2: its input quantizer LearnedStepAct declares no spec"
    else:
        layer.weight_quant = DmbqWeight(layer.weight_quant, 2)  # not frozen: still training
        match = "layers.2.0.conv2: its DMBQ quantizer is still training"
    for report in (lowbit.summary, lowbit.deploy.size.quantized_bytes):
        with pytest.raises(LowbitError, match=match):
            report(mid)


def test_inspect_cli(q, fp, tmp_path, capsys) -> None:
    path = lowbit.export(q, tmp_path / "m.lowbit")
    assert main(["inspect", str(path), "--json"]) == 0  # the artifact names its zoo arch: no model needed
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == lowbit.summary(q).to_dict()["layers"]
    assert out["totals"] == pytest.approx(lowbit.summary(q).totals)
    assert main(["inspect", str(path)]) == 0
    assert lowbit.summary(q).to_markdown() in capsys.readouterr().out
    # an artifact of a model without a zoo record needs --model
    plain = make_model("zoofree")
    qz = lowbit.quantize(plain, calib_tensor(8), layer_bits={"*": 4})
    zpath = lowbit.export(qz, tmp_path / "z.lowbit")
    assert main(["inspect", str(zpath)]) == 2
    assert capsys.readouterr().err.strip().endswith("names no zoo architecture: pass --model NAME (and --model-kwargs)")
    assert main(["inspect", str(path), "--model", "resnet20", "--model-kwargs", '{"width": 4}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["fp_layers"] == 1


def test_a_fully_pruned_layer_counts_zero_bits_and_a_float_layer_32() -> None:
    from lowbit.summary import LayerSummary, _totals

    rows = [LayerSummary("a", "conv2d", "body", 0, 4, 100, 0),  # every channel pruned
            LayerSummary("b", "conv2d", "body", 4, 4, 100, 58),
            LayerSummary("fc", "linear", "last", None, None, 200, 800)]
    totals = _totals(rows, 858)
    assert totals["avg_w_bits"] == (100 * 0 + 100 * 4 + 200 * 32) / 400
    assert totals["avg_w_bits_quantized"] == 2.0 and totals["fp_layers"] == 1
