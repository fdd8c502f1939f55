"""TSQ fine-tune: latent weights keep the step-2 codes but carry the step-1 weights (codes can flip)."""
from __future__ import annotations

import torch

from lowbit.qat.tsq import project_latent_weights
from torch import nn

from lowbit.quant.quantizer import WeightQuantizer




def test_projection_keeps_codes_and_moves_towards_step1() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3)
    layer.weight_quant = wq = WeightQuantizer(2, 6)
    wq.enabled = True
    wq.scale.copy_(torch.rand(wq.num_groups) * 0.1 + 0.05)
    s, _ = wq.channel_params(4)
    codes = torch.randint(-1, 2, layer.weight.shape).float()
    fp = torch.randn(layer.weight.shape) * 0.2
    with torch.no_grad():
        layer.weight.copy_(codes * s)  # what step 2 leaves: bin centres
    before = wq(layer.weight).clone()
    project_latent_weights(layer, fp)
    assert torch.equal(wq(layer.weight), before)  # the fine-tune starts from the step-2 network exactly
    moved = (layer.weight - codes * s).abs()
    assert moved.max() < 0.5 * s.max() and moved.mean() > 0.1 * s.mean()  # off the centres, inside the bins
    # every latent weight is the point of its bin nearest to the step-1 weight
    inside = ((fp / s - codes).abs() < 0.48)
    assert torch.allclose(layer.weight[inside], fp[inside])
