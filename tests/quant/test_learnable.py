"""Learned step sizes (LSQ) and learned rounding (AdaRound) stand-ins for the quantizers."""
from __future__ import annotations

import torch

from lowbit.quant.learnable import LearnedStepAct, LearnedStepWeight, SoftRoundWeight, scale_grad
from lowbit.quant.quantizer import ActQuantizer, WeightQuantizer
from lowbit.quant.ranges import minmax_range


def _weight_quant(w: torch.Tensor, bits: int = 3, granularity: str = "channel") -> WeightQuantizer:
    q = WeightQuantizer(bits, w.shape[0], granularity)
    q.calibrate(w, minmax_range)
    return q


def test_scale_grad_changes_gradient_only() -> None:
    x = torch.tensor([2.0], requires_grad=True)
    y = scale_grad(x, 0.25)
    assert y.item() == 2.0
    y.backward()
    assert x.grad.item() == 0.25


def test_learned_step_weight_matches_quantizer_and_learns_scale() -> None:
    w = torch.randn(4, 3, 3, 3)
    q = _weight_quant(w)
    learned = LearnedStepWeight(q, w)
    assert torch.allclose(learned(w), q(w))
    out = learned(w.requires_grad_())
    out.pow(2).sum().backward()
    assert learned.scale.grad is not None and learned.scale.grad.shape == (4,)
    assert w.grad is not None  # straight-through to the latent weight
    with torch.no_grad():
        learned.scale.mul_(1.5)
    committed = learned.commit()
    assert committed is q and torch.allclose(q.scale, learned.scale)


def test_learned_step_act_drop_keeps_fp_values() -> None:
    aq = ActQuantizer(2)
    aq.set_range(0.0, 1.0)
    act = LearnedStepAct(aq, drop_prob=0.5)
    x = torch.rand(10000)
    act.eval()
    assert torch.allclose(act(x), aq(x))
    act.train()
    out = act(x)
    kept_fp = (out == x) & (aq(x) != x)
    assert 0.35 < kept_fp.float().mean().item() < 0.6  # roughly half dropped (of the values that differ)


def test_soft_rounding_starts_near_fp_and_commits_to_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    q = _weight_quant(w, bits=4)
    rounder = SoftRoundWeight(q, w)
    s, _ = q.channel_params(4)
    clipped = torch.clamp(w / s, -7, 7) * s
    assert torch.allclose(rounder(w), clipped, atol=1e-3 * s.max().item())  # starts at the FP weight
    layer = torch.nn.Conv2d(4, 6, 3)
    layer.weight.data.copy_(w)
    q2 = rounder.commit(layer)
    ints = layer.weight / s
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    assert ints.round().abs().max() <= 7
    # every weight was rounded to floor or ceil of its FP value, and the plain quantizer agrees
    assert ((ints - torch.floor(w / s)).round().abs() <= 1).all()
    assert torch.allclose(q2(layer.weight), layer.weight)


def test_regularizer_is_zero_at_hard_decisions() -> None:
    w = torch.randn(2, 8)
    q = _weight_quant(w)
    r = SoftRoundWeight(q, w)
    with torch.no_grad():
        r.v.copy_(torch.where(r.v >= 0, 10.0, -10.0))
    assert r.regularizer(2.0).item() == 0.0


def test_fused_act_fake_quant_matches_autograd_reference() -> None:
    from lowbit.quant.learnable import _LsqFakeQuant
    from lowbit.quant.uniform import fake_quantize

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, generator=gen) * 2).requires_grad_()
    for zp, (qmin, qmax), use_keep in [(0.0, (0, 15), False), (3.0, (0, 15), True), (0.0, (-8, 7), True)]:
        s = torch.tensor([0.3], requires_grad=True)
        z = torch.tensor([zp])
        keep = torch.rand(x.shape, generator=gen) < 0.5 if use_keep else None
        g = torch.randn(x.shape, generator=gen)
        ref = fake_quantize(x, s, z, qmin, qmax)
        if keep is not None:
            ref = torch.where(keep, x, ref)
        gx_ref, gs_ref = torch.autograd.grad((ref * g).sum(), (x, s))
        out = _LsqFakeQuant.apply(x, s, z, qmin, qmax, keep)
        gx, gs = torch.autograd.grad((out * g).sum(), (x, s))
        assert torch.allclose(out, ref)
        assert torch.allclose(gx, gx_ref)
        assert torch.allclose(gs, gs_ref, rtol=1e-4, atol=1e-4)
