"""Round trips: quantize -> artifact -> load (identical logits) -> ONNX -> ONNX Runtime (parity).

Every zoo model at W8A8, W4A4 and W2A4 with minmax, and models from the other PTQ methods.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.deploy import read_artifact
from lowbit.quant.layers import quant_layers
from tests.conftest import ZOO_SPECS, calib_tensor, make_model

pytest.importorskip("onnxruntime")
from tests.deploy.test_onnx import assert_matches_simulation  # noqa: E402  (needs onnx / onnxruntime)

CONFIGS = {"W8A8": (8, 8), "W4A4": (4, 4), "W2A4": (2, 4)}


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def round_trip(q: nn.Module, tmp_path, model: nn.Module | None = None) -> nn.Module:
    """Artifact -> load gives the same logits and codes; the loaded model's ONNX graph matches ``q`` in ORT."""
    images = calib_tensor(64, seed=7)
    path = lowbit.export(q, tmp_path / "m.lowbit")
    loaded = lowbit.load(path, model=model)
    assert torch.equal(logits(loaded, images), logits(q, images))
    ours, theirs = dict(quant_layers(q)), dict(quant_layers(loaded))
    for name, layer in ours.items():  # the same codes and simulated weights (q keeps its FP weights)
        assert torch.equal(theirs[name].weight_quant(theirs[name].weight), layer.weight_quant(layer.weight)), name
        if layer.weight_quant.enabled:
            assert torch.equal(theirs[name].weight_quant.quantize(theirs[name].weight).int_value,
                               layer.weight_quant.quantize(layer.weight).int_value), name
    # the loaded model exports to ONNX at the recorded input shape, and ORT reproduces the original
    onnx_path = lowbit.export(loaded, tmp_path / "m.onnx")
    assert_matches_simulation(q, onnx_path, images)
    return loaded


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", lowbit.list_models())
def test_every_zoo_model_minmax(name, config, tmp_path) -> None:
    if name not in ZOO_SPECS:
        pytest.fail(f"zoo model {name!r} has no tiny spec in tests/conftest.py ZOO_SPECS")
    w_bits, a_bits = CONFIGS[config]
    q = lowbit.quantize(make_model(name), calib_tensor(16), w_bits=w_bits, a_bits=a_bits, method="minmax")
    loaded = round_trip(q, tmp_path)  # zoo artifacts rebuild their architecture: no model= needed
    assert loaded.lowbit_info["arch"] == {"name": name, "kwargs": ZOO_SPECS[name]}
    body = [s for s in read_artifact(tmp_path / "m.lowbit")[0]["layers"].values() if s["role"] == "body"]
    assert body and {s["w_bits"] for s in body} == {w_bits}


@pytest.mark.parametrize("method, options", [
    ("bitsplit", {"samples": 2000}),
    ("mse", {}),
])
@pytest.mark.parametrize("name", ["resnet20", "zoofree"])
@pytest.mark.parametrize("w_bits, a_bits", [(4, 4), (2, 4)])
def test_other_methods(method, options, name, w_bits, a_bits, tmp_path) -> None:
    model = make_model(name)
    q = lowbit.quantize(model, calib_tensor(32), w_bits=w_bits, a_bits=a_bits, method=method, **options)
    loaded = round_trip(q, tmp_path, model=model)
    assert loaded.lowbit_info["method"] == method
    assert loaded.lowbit_info["options"] == q.lowbit_info["options"]
