"""allocate_bits -> layer_bits -> quantize -> summary: the map is usable as is and its true average holds."""
from __future__ import annotations

import pytest

import lowbit
from tests.conftest import calib_tensor, make_zoo


@pytest.mark.parametrize("budget", [2.5, 3.0])
def test_allocated_map_quantizes_within_its_budget(budget):
    model = make_zoo("resnet20")
    calib = calib_tensor(16)
    bits = lowbit.allocate_bits(model, calib, avg_w_bits=budget, candidates=(2, 3, 4, 8), metric="kl")
    q = lowbit.quantize(model, calib, w_bits=4, a_bits=8, method="minmax", layer_bits=bits)
    totals = lowbit.summary(q).totals
    assert totals["avg_w_bits_quantized"] <= budget + 1e-9
    assert totals["avg_w_bits_quantized"] > budget - 0.5  # the budget is used, not wasted
    widths = {name: layer.weight_quant.bits for name, layer in lowbit.quant.layers.quant_layers(q)}
    assert all(widths[name] == w for name, w in bits.items())  # every allocated width is the one quantized
