"""GDRQ with Scale-Clip off (the seed's ablation): plain max thresholds, same groups and BN folding."""
from __future__ import annotations

import torch

import lowbit
from lowbit.config import QuantConfig
from lowbit.graph.fold import find_conv_bn_pairs
from lowbit.graph.surgery import prepare
from lowbit.qat.gdrq import GdrqOptions, ScaleClipAct, ScaleClipWeight, gdrq_setup
from lowbit.quant.layers import quant_layers
from lowbit.quant.quantizer import WeightQuantizer

from ..conftest import calib_tensor, make_model


def test_weight_threshold_is_the_group_max_and_nothing_is_clipped() -> None:
    w = (torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    sc = ScaleClipWeight(WeightQuantizer(4, 8, "group", 4), k=None)
    out = sc(w)
    t = w.detach().abs().reshape(4, -1).amax(1)
    assert torch.allclose(sc.step(w), t / 7)
    # min/max range: the largest weight of each group is a code exactly, and every gradient passes
    rows = out.detach().reshape(4, -1)
    assert torch.allclose(rows.abs().amax(1), t, rtol=1e-6)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_setup_without_scale_clip_starts_at_calibration_max_and_records_it() -> None:
    fp = make_model("resnet20", 0)
    x = calib_tensor(32, seed=5)
    cfg = QuantConfig(w_bits=2, a_bits=4, fold_bn=False, progress=False, granularity="group", groups=4)
    qmodel, _ = prepare(fp, cfg, x[:2])
    lowbit.record_of(qmodel).bn_pairs = find_conv_bn_pairs(fp)
    gdrq_setup(qmodel, x, cfg, GdrqOptions(scale_clip=False))
    acts = [l.input_quant for _, l in quant_layers(qmodel) if isinstance(l.input_quant, ScaleClipAct)]
    weights = [l.weight_quant for _, l in quant_layers(qmodel) if isinstance(l.weight_quant, ScaleClipWeight)]
    assert acts and weights
    assert all(a.k is None for a in acts) and all(w.k is None for w in weights)
    assert set(lowbit.record_of(qmodel).gdrq_k.values()) == {"max"}
    # an activation batch's threshold is its max |x| when Scale-Clip is off
    a = acts[0]
    a.train()
    a.initialized.fill_(False)
    batch = torch.randn(4, 16, 8, 8).relu()
    a(batch)
    assert torch.allclose(a.threshold, batch.abs().max().reshape(1))


def test_qat_runs_with_scale_clip_off_and_differs_from_on() -> None:
    fp = make_model("resnet20", 0)
    x = calib_tensor(32, seed=5)
    with torch.no_grad():
        y = fp(x).argmax(1)
    common = dict(method="gdrq", w_bits=2, a_bits=4, epochs=1, batch_size=16, calib_size=16, progress=False)
    off = lowbit.qat(fp, (x, y), scale_clip=False, **common)
    on = lowbit.qat(fp, (x, y), **common)
    with torch.no_grad():
        assert not torch.equal(off(x), on(x))
