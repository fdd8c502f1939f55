"""Version-4 artifacts of layers with per-channel widths and pruned channels still load identically.

Version 4 stored every channel of a layer with per-channel widths at the layer's storage width (the
widest), pruned channels included; version 5 packs each channel at its own width. The fixtures were
written by ``lowbit.export`` at commit bfdf945 (the version-4 writer) from ``build(symmetric)`` below,
with the logits of the exported model on ``images`` in ``channels_v4_expected.safetensors``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lowbit
from lowbit.quant.layer_specs import layer_specs
from tests.conftest import calib_tensor, make_model

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = FIXTURES / "channels_v4_expected.safetensors"
# per-channel widths with binary (1-bit), pruned (0) and 8-bit channels, and per-layer widths beside them
LAYER_BITS = {"layers.0.0.conv1": [4, 2, 0, 1], "layers.1.0.conv1": [3, 3, 2, 8, 1, 1, 0, 4],
              "layers.2.0.conv2": [8, 0] * 8, "layers.2.1.conv1": 2, "fc": 6}


def fixture_path(symmetric: bool) -> Path:
    return FIXTURES / f"channels_v4_{'sym' if symmetric else 'asym'}.lowbit"


def build(symmetric: bool) -> torch.nn.Module:
    """The fixture's model: tiny ResNet-20, minmax W4A4, ``LAYER_BITS`` (asymmetric: zero points stored)."""
    return lowbit.quantize(make_model("resnet20"), calib_tensor(16), w_bits=4, a_bits=4, method="minmax",
                           w_symmetric=symmetric, layer_bits=LAYER_BITS)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_version_4_channel_widths_load_identically(symmetric, tmp_path) -> None:
    path = fixture_path(symmetric)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["version"] == "4"
    expected = load_file(str(EXPECTED))
    images = expected["images"]
    old = lowbit.load(path)  # the file names its zoo architecture
    with torch.no_grad():
        assert torch.equal(old(images), expected[f"logits_{'sym' if symmetric else 'asym'}"])
    # a model rebuilt the same way: the same widths and code books, the same predictions
    rebuilt = build(symmetric)
    assert lowbit.record_of(old).layer_bits == lowbit.record_of(rebuilt).layer_bits
    assert [s.weight.group_bits if s.weight else None for s in layer_specs(old)] == \
           [s.weight.group_bits if s.weight else None for s in layer_specs(rebuilt)]
    with torch.no_grad():
        assert torch.equal(old(images).argmax(1), rebuilt(images).argmax(1))
    # rewritten in the current version: the same model, in fewer bytes
    again = lowbit.export(old, tmp_path / "again.lowbit")
    assert layer_specs(lowbit.load(again)) == layer_specs(old)
    with torch.no_grad():
        assert torch.equal(lowbit.load(again)(images), expected[f"logits_{'sym' if symmetric else 'asym'}"])
    assert again.stat().st_size < path.stat().st_size
