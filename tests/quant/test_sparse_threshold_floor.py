"""Sparse codes (TSQ): the threshold floor at half a step (least-squares threshold, follows the learned step)."""
from __future__ import annotations

import torch

import lowbit
from lowbit.quant.layers import quant_layers
from lowbit.quant.sparse import SparseActQuantizer, SparseStepAct, fit_sparse_step, positive_quantile, sparse_codes

from ..conftest import calib_tensor, make_model


def _err(x: torch.Tensor, eps: float, step: float) -> float:
    return (sparse_codes(x, torch.tensor(eps), torch.tensor(step), 3) * step - x).pow(2).sum().item()


def test_floor_fit_beats_every_quantile_threshold() -> None:
    x = torch.relu(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    step = fit_sparse_step(x, 0.0, 3, floor=0.5)
    best = _err(x, 0.5 * step, step)
    for share in (0.0, 0.1, 0.3, 0.5):  # a quantile threshold with its own best step does worse
        eps = positive_quantile(x, share)
        assert best < _err(x, eps, fit_sparse_step(x, eps, 3))


def test_floor_follows_the_learned_step_and_commits() -> None:
    q = SparseActQuantizer(2, 0.0)
    q.scale.fill_(0.5)
    act = SparseStepAct(q, sparsity=0.0, track=True, floor=0.5).train()
    x = torch.tensor([0.1, 0.24, 0.26, 0.9])
    # below half a step: 0 (a threshold of 0 would round them up to 0.5)
    assert torch.equal(act(x).detach(), torch.tensor([0.0, 0.0, 0.5, 1.0]))
    with torch.no_grad():
        act.scale.fill_(1.0)
    assert torch.equal(act(x).detach(), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    committed = act.commit()
    assert committed.threshold.item() == 0.5 and torch.equal(committed(x), torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_tsq_default_thresholds_are_at_least_half_a_step() -> None:
    fp = make_model("resnet20", 0)
    x = calib_tensor(32, seed=3)
    with torch.no_grad():
        y = fp(x).argmax(1)
    q = lowbit.qat(fp, (x, y), method="tsq", w_bits=2, a_bits=2, epochs=1, batch_size=16, lr=0.01, progress=False,
                   log=lambda s: None, samples=64, iters=1)
    sparse = [l.input_quant for _, l in quant_layers(q) if isinstance(l.input_quant, SparseActQuantizer)]
    assert sparse
    for s in sparse:
        assert s.threshold.item() >= 0.5 * s.scale.item() * (1 - 1e-6)
