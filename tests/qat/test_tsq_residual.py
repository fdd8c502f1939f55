"""TSQ step 2 with residual targets: the shifted solver never increases its objective, and the routes
found on a ResNet reproduce the step-1 network's own codes from its X rows, weights and shortcut offsets."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.qat.tsq import _by_group, _consumer_levels, _step1_targets, init_codes, sparse_levels, true_objective, tsq_fit
from lowbit.ptq.layerwise import weight_rows
from lowbit.quant.layers import quant_layers
from lowbit.quant.learnable import commit_stand_ins

from ..conftest import calib_tensor, make_model


@pytest.mark.parametrize("bits", [2, 3])
def test_shifted_solver_never_increases_its_objective(bits: int) -> None:
    gen = torch.Generator().manual_seed(7 + bits)
    K, R, C, D = 1, 300, 5, 10
    X = torch.relu(torch.randn(K, R, D, generator=gen, dtype=torch.float64))
    w_true = torch.randn(K, C, D, generator=gen, dtype=torch.float64)
    bias = torch.randn(K, C, generator=gen, dtype=torch.float64) * 0.1
    offset = torch.randn(K, R, C, generator=gen, dtype=torch.float64)  # the shortcut, per position
    levels = sparse_levels(0.4, 0.6, 3, None, torch.float64, torch.device("cpu"))
    y = levels(torch.bmm(X, w_true.transpose(1, 2)) + bias.unsqueeze(1) + offset)
    history: list[float] = []
    w0 = w_true + 0.3 * torch.randn(K, C, D, generator=gen, dtype=torch.float64)
    q, alpha = tsq_fit(X, y, bias, w0, bits, levels, iters=5, history=history, offset=offset)
    assert len(history) == 4 * 5
    for a, b in zip(history, history[1:]):
        assert b <= a * (1 + 1e-9) + 1e-9
    q0, a0 = init_codes(w0, bits, False)
    fitted = true_objective(X, y, bias, q, alpha, levels, offset).sum()
    assert fitted < true_objective(X, y, bias, q0, a0, levels, offset).sum()
    # the offset is part of the model: ignoring it fits worse on the same targets
    assert fitted < true_objective(X, y, bias, q, alpha, levels).sum()
    with pytest.raises(LowbitError, match="offset"):
        tsq_fit(X, y, bias, w0, bits, None, offset=offset)


def test_routes_reproduce_the_step1_codes() -> None:
    fp = make_model("resnet20", 0)
    x = calib_tensor(16, seed=3)
    with torch.no_grad():
        labels = fp(x).argmax(1)
    q = lowbit.qat(fp, (x, labels), method="tsq", w_bits=2, a_bits=2, epochs=1, batch_size=8,
                   max_steps=1, progress=False, log=lambda s: None)  # step 1 only: FP weights
    layers = dict(quant_layers(q))
    commit_stand_ins(layers.values())
    q.eval()
    names = [n for n, l in layers.items() if l.role == "body"]
    torch.set_grad_enabled(False)
    try:
        _check_routes(q, layers, names, x, residual=True)
        off = _step1_targets(q, names, x, samples=64, seed=0, device=torch.device("cpu"), keep_x=True,
                             residual=False)
        assert all(d.route is None or d.route.residual is None for d in off.values())
    finally:
        torch.set_grad_enabled(True)


def _check_routes(q, layers, names, x, residual: bool) -> None:
    data = _step1_targets(q, names, x, samples=64, seed=0, device=torch.device("cpu"), keep_x=True, residual=True)
    residual = [n for n, d in data.items() if d.route is not None and d.route.residual is not None]
    # every block's second conv reaches the next block through relu(conv2 + shortcut); the last
    # one feeds the pooled classifier (not a quantized input of the same shape): identity
    assert residual and all(n.endswith(("conv2", "shortcut.0")) for n in residual)
    assert any(n.endswith("conv2") for n in residual) and any(n.endswith("shortcut.0") for n in residual)
    for name, d in data.items():
        if d.route is None:
            continue
        layer = layers[name]
        W = weight_rows(layer, layer.weight.double())
        K = W.shape[0]
        X = torch.cat(d.xs, 1).double()
        b = layer.bias.double().reshape(K, -1) if layer.bias is not None else torch.zeros(W.shape[:2]).double()
        v = torch.bmm(X, W.transpose(1, 2)) + b.unsqueeze(1)
        if d.route.residual is not None:
            v = v + _by_group(torch.cat(d.offsets, 0), K).double()
        levels = _consumer_levels(layers[d.route.consumer], d.route.act, torch.float64, torch.device("cpu"))
        # Y holds float32 code values, the levels float64 ones: equal up to rounding
        agree = ((levels(v) - d.Y(K).double()).abs() < 1e-5 * levels.value[-1]).double().mean().item()
        assert agree >= 0.99, (name, agree)
