"""Sparse activation codes (TSQ): levels, threshold, straight-through gradient mask, threshold tracking."""
from __future__ import annotations

import torch

from lowbit.quant.quantizer import ActQuantizer
from lowbit.quant.sparse import (SparseActQuantizer, SparseStepAct, fit_sparse_step, positive_quantile, sparse_codes,
                                 sparse_gate)


def _quantizer(step: float, threshold: float, bits: int = 2) -> SparseActQuantizer:
    q = SparseActQuantizer(bits, threshold)
    q.scale.fill_(step)
    return q


def test_levels_and_threshold() -> None:
    q = _quantizer(0.5, 0.1)
    x = torch.tensor([-1.0, 0.0, 0.05, 0.1, 0.12, 0.3, 0.74, 0.76, 1.2, 1.3, 2.0, 9.0])
    # 0 up to and at the threshold; above it the uniform levels 0.5, 1.0, 1.5, never 0 (0.12 rounds up)
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.5])
    assert torch.equal(q(x), expected)
    assert torch.equal(q.quantize(x).int_value, (expected / 0.5).to(q.quantize(x).int_value.dtype))
    # a threshold above the first level's half step removes that level's lower part
    q = _quantizer(0.5, 0.6)
    assert torch.equal(q(torch.tensor([0.55, 0.6, 0.61, 0.8])), torch.tensor([0.0, 0.0, 0.5, 1.0]))


def test_threshold_zero_share_and_plain_equivalence() -> None:
    x = torch.rand(10000) * 3
    eps = positive_quantile(x, 0.4)
    q = _quantizer(0.5, eps, bits=3)
    assert abs((q(x) == 0).float().mean().item() - 0.4) < 0.01
    # the sparse codes are the plain uniform codes of the gated input (what ONNX and the integer path compute)
    plain = ActQuantizer(3)
    plain.scale.fill_(0.5)
    assert torch.equal(q(x), plain(sparse_gate(x, q.threshold, q.scale)))
    assert torch.equal(sparse_codes(x, q.threshold, q.scale, 7) * 0.5, q(x))


def test_ste_gradient_mask_and_step_gradient() -> None:
    quant = _quantizer(0.5, 0.3)
    act = SparseStepAct(quant, sparsity=0.5, track=False)
    act.train()
    x = torch.tensor([-0.5, 0.1, 0.3, 0.31, 0.9, 1.5, 1.6, 3.0], requires_grad=True)
    out = act(x)
    out.sum().backward()
    # gradient 1 exactly inside the active range (eps, qmax * step] = (0.3, 1.5], 0 elsewhere
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    assert act.scale.grad is not None and act.scale.grad.abs().item() > 0
    assert torch.equal(quant.threshold, torch.tensor([0.3]))  # not tracked
    with torch.no_grad():
        assert torch.equal(out, quant(x))  # the committed quantizer computes the same values


def test_threshold_tracks_the_batch_quantile() -> None:
    quant = _quantizer(0.5, 0.0)
    act = SparseStepAct(quant, sparsity=0.5, momentum=0.5, track=True).train()
    x = torch.rand(4, 8, 8) * 2  # median of the positives about 1
    for _ in range(12):
        act(x)
    assert abs(quant.threshold.item() - positive_quantile(x, 0.5)) < 1e-3
    act.eval()
    before = quant.threshold.clone()
    act(x * 5)
    assert torch.equal(quant.threshold, before)  # frozen in eval mode


def test_fitted_step_beats_the_max_range() -> None:
    x = torch.relu(torch.randn(20000))
    eps = positive_quantile(x, 0.3)
    step = fit_sparse_step(x, eps, 3)
    err = lambda s: (sparse_codes(x, torch.tensor(eps), torch.tensor(s), 3) * s - x).pow(2).sum()  # noqa: E731
    assert err(step) < err(x.max().item() / 3)
