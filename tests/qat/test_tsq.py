"""TSQ: optimal ternary approximation, the step-2 solver, the QAT method end to end, resume, options."""
from __future__ import annotations

import itertools

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.qat.tsq import Levels, _z_step, optimal_ternary, relaxed_objective, sparse_levels, true_objective, tsq_fit
from lowbit.quant.layers import quant_layers
from lowbit.quant.sparse import SparseActQuantizer

from ..conftest import self_labelled

TINY = dict(w_bits=2, a_bits=2, epochs=1, batch_size=16, lr=0.01, progress=False, log=lambda s: None,
            samples=128, iters=2)


def _data(n: int = 64, seed: int = 0):
    return self_labelled("resnet20", n, seed)


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_optimal_ternary_matches_brute_force(d: int) -> None:
    w = torch.randn(40, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    w[0] = 0.0  # an all-zero row
    t, alpha = optimal_ternary(w)
    assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    got = ((w - alpha.unsqueeze(-1) * t) ** 2).sum(-1)
    best = torch.full((len(w),), float("inf"), dtype=torch.float64)
    for code in itertools.product((-1.0, 0.0, 1.0), repeat=d):
        c = torch.tensor(code, dtype=torch.float64)
        if not c.any():
            err = (w ** 2).sum(-1)
        else:
            a = (w @ c / (c @ c)).clamp_min(0)  # alpha >= 0
            err = ((w - a.unsqueeze(-1) * c) ** 2).sum(-1)
        best = torch.minimum(best, err)
    assert torch.allclose(got, best, rtol=1e-12, atol=1e-12)


def test_z_step_is_the_exact_minimiser() -> None:
    levels = sparse_levels(0.3, 0.5, 3, None, torch.float64, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (500,), generator=gen).double() * 0.5
    v = torch.randn(500, generator=gen, dtype=torch.float64)
    z, qz = _z_step(y, v, levels, 0.7)
    assert torch.equal(levels(z), qz)  # z is a point of the level it was assigned
    cost = (y - qz) ** 2 + 0.7 * (z - v) ** 2
    grid = torch.linspace(-3, 4, 7001, dtype=torch.float64)
    brute = ((y.unsqueeze(1) - levels(grid).unsqueeze(0)) ** 2 + 0.7 * (grid.unsqueeze(0) - v.unsqueeze(1)) ** 2)
    assert (cost <= brute.min(1).values + 1e-8).all()


@pytest.mark.parametrize("bits,nonlinear,narrow", [(2, True, True), (2, False, True), (3, True, True),
                                                   (4, True, True), (1, True, True), (2, True, False),
                                                   (3, False, False)])
def test_solver_never_increases_its_objective(bits: int, nonlinear: bool, narrow: bool) -> None:
    gen = torch.Generator().manual_seed(bits)
    K, R, C, D = 1, 400, 6, 12
    X = torch.relu(torch.randn(K, R, D, generator=gen, dtype=torch.float64))
    w_true = torch.randn(K, C, D, generator=gen, dtype=torch.float64)
    bias = torch.randn(K, C, generator=gen, dtype=torch.float64) * 0.1
    lin = torch.bmm(X, w_true.transpose(1, 2)) + bias.unsqueeze(1)
    levels = sparse_levels(0.4, 0.6, 3, None, torch.float64, torch.device("cpu")) if nonlinear else None
    y = levels(lin) if nonlinear else lin
    history: list[float] = []
    w0 = w_true + 0.3 * torch.randn(K, C, D, generator=gen, dtype=torch.float64)
    q, alpha = tsq_fit(X, y, bias, w0, bits, levels, lam=1.0, iters=6, binary=bits == 1, history=history,
                       narrow=narrow)
    assert len(history) == 4 * 6
    for a, b in zip(history, history[1:]):
        assert b <= a * (1 + 1e-9) + 1e-9
    qmax = 1 if bits == 1 else 2 ** (bits - 1) - 1
    qmin = -qmax if narrow or bits == 1 else -qmax - 1
    assert q.min() >= qmin and q.max() <= qmax and torch.equal(q, q.round()) and (alpha > 0).all()
    if bits == 1:
        assert set(q.unique().tolist()) == {-1.0, 1.0}
    # the fit beats the initialisation on the true objective too
    from lowbit.qat.tsq import init_codes
    q0, a0 = init_codes(w0, bits, bits == 1, narrow)
    assert true_objective(X, y, bias, q, alpha, levels).sum() < true_objective(X, y, bias, q0, a0, levels).sum()


def test_levels_with_a_cap_reach_infinity() -> None:
    lv = sparse_levels(0.1, 2.5, 3, 6.0, torch.float64, torch.device("cpu"))  # ReLU6 into 2.5-steps
    z = torch.tensor([-1.0, 0.05, 2.0, 6.0, 100.0], dtype=torch.float64)
    assert torch.equal(lv(z), torch.tensor([0.0, 0.0, 2.5, 5.0, 5.0], dtype=torch.float64))
    assert isinstance(lv, Levels)
    # relaxed objective is zero at an exact fit
    X = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    q = torch.ones(1, 2, 3, dtype=torch.float64)
    a = torch.ones(1, 2, dtype=torch.float64)
    v = torch.bmm(X, q.transpose(1, 2))
    assert relaxed_objective(X, v, torch.zeros(1, 2, dtype=torch.float64), q, a, v, v, 1.0).abs().max() == 0


def test_tsq_end_to_end_round_trips(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from lowbit.deploy.integer import integer_agreement, integer_model, with_int32_bias
    from tests.deploy.test_onnx import assert_matches_simulation

    fp, x, y = _data(32)
    q = lowbit.qat(fp, (x, y), method="tsq", **TINY)
    layers = dict(quant_layers(q))
    sparse = [n for n, l in layers.items() if isinstance(l.input_quant, SparseActQuantizer)]
    assert sparse and all(layers[n].input_quant.threshold.item() > 0 for n in sparse)
    for name, layer in layers.items():  # body weights ternary, every weight quantizer on again
        assert layer.weight_quant.enabled
        if layer.role == "body":
            codes = layer.weight_quant.quantize(layer.weight).int_value
            assert set(codes.unique().tolist()) <= {-1, 0, 1}
            assert torch.equal(layer.weight_quant(layer.weight), layer.weight)  # weights on the grid
    rep = lowbit.record_of(q).tsq
    assert len(rep["step2"]) == len(layers) and all(r["rel_error"] <= r["rel_error_init"] + 1e-6 for r in rep["step2"])
    assert any(r["target"] != "linear" for r in rep["step2"])  # conv -> ReLU -> conv found
    # artifact: thresholds survive, identical predictions
    path = lowbit.export(q, tmp_path / "m.lowbit")
    manifest, _ = lowbit.deploy.read_artifact(path)
    assert manifest["sparse_inputs"] == [n for n in manifest["layer_order"] if n in sparse]
    loaded = lowbit.load(path, model=fp)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    # ONNX: a Where gate per sparse input, ORT matches the simulation
    onnx_path = lowbit.export(loaded, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(onnx_path)).graph.node]
    assert 0 < ops.count("Where") <= len(sparse)  # torch.export merges identical gates on a shared input
    assert_matches_simulation(q, onnx_path, x)
    # integer path: conv -> ReLU -> conv requantizes in fixed point with the threshold compared on the
    # accumulator; it reproduces the simulation with int32 biases, and with 16 fractional bias bits
    # the simulation itself (codes apart only where float sums land on a boundary)
    device = integer_model(q)
    assert device.requantized
    for agree in (integer_agreement(with_int32_bias(q), x, device),
                  integer_agreement(q, x, integer_model(q, bias_frac_bits=16))):
        assert agree["argmax_agreement"] == 100.0 and agree["code_agreement"] >= 99.99, agree


def test_tsq_resume_gives_the_same_weights(tmp_path) -> None:
    fp, x, y = _data(32)
    kw = {**TINY, "epochs": 2}
    full = lowbit.qat(fp, (x, y), method="tsq", **kw)
    ckpt = tmp_path / "run.ckpt"
    part = lowbit.qat(fp, (x, y), method="tsq", checkpoint=str(ckpt), max_steps=3, **kw)
    assert not lowbit.record_of(part).qat["finished"]
    done = lowbit.qat(fp, (x, y), method="tsq", checkpoint=str(ckpt), resume=True, **kw)
    for (n, a), b in zip(full.state_dict().items(), done.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(LowbitError, match="different run"):
        lowbit.qat(fp, (x, y), method="tsq", checkpoint=str(ckpt), resume=True, **{**kw, "sparsity": 0.3})


def test_tsq_finetune_and_options() -> None:
    fp, x, y = _data(32)
    q = lowbit.qat(fp, (x, y), method="tsq", finetune_epochs=1, error_compensation=False, track_threshold=False,
                   w_narrow=False, **TINY)  # full 2-bit range {-2, -1, 0, 1}
    assert len(lowbit.record_of(q).tsq["finetune"]) == 1
    for name, layer in quant_layers(q):
        if layer.role == "body":
            assert set(layer.weight_quant.quantize(layer.weight).int_value.unique().tolist()) <= {-2, -1, 0, 1}
    for bad in ({"sparsity": 1.5}, {"sparsity": "half"}, {"iters": 0}, {"lam": 0.0}, {"finetune_epochs": -1}):
        with pytest.raises(LowbitError):
            lowbit.qat(fp, (x, y), method="tsq", **{**TINY, **bad})
    with pytest.raises(LowbitError, match="granularity"):
        lowbit.qat(fp, (x, y), method="tsq", granularity="tensor", **TINY)
    assert "tsq" in lowbit.qat_methods()


def test_finetune_bn_starts_as_identity_and_folds_exactly() -> None:
    from lowbit.qat.tsq import fold_train_bn, insert_train_bn

    fp, x, _ = _data(32)
    q = lowbit.quantize(fp, x, w_bits=2, a_bits=2, progress=False).eval()  # per-channel ternary convs
    with torch.no_grad():
        before = q(x)
        entries = insert_train_bn(q, x, torch.device("cpu"))
        assert len(entries) == sum(1 for _, l in quant_layers(q) if l.weight.dim() == 4)
        assert torch.allclose(q(x), before, atol=1e-4)  # identity in eval mode
        gen = torch.Generator().manual_seed(1)
        for _, tb, _ in entries:  # what a fine-tune might leave, one multiplier negative
            bn = tb.bn
            c = bn.num_features
            bn.weight.mul_(torch.rand(c, generator=gen) + 0.5)
            bn.weight[0] = -bn.weight[0]
            bn.bias.add_(torch.randn(c, generator=gen) * 0.1)
            bn.running_mean.add_(torch.randn(c, generator=gen) * 0.1)
            bn.running_var.mul_(torch.rand(c, generator=gen) + 0.5)
        with_bn = q(x)
        assert not torch.allclose(with_bn, before, atol=1e-3)
        fold_train_bn(entries)
        assert not any(hasattr(l, "tsq_bn") or l._forward_hooks for _, l in quant_layers(q))
        assert torch.allclose(q(x), with_bn, atol=1e-4, rtol=1e-4)
        for _, layer in quant_layers(q):  # the folded convs still on their (ternary in the body) grid
            wq = layer.weight_quant
            if layer.weight.dim() == 4:
                assert torch.allclose(wq(layer.weight), layer.weight, rtol=1e-6, atol=0)
            if layer.role == "body":
                assert set(wq.quantize(layer.weight).int_value.unique().tolist()) <= {-1, 0, 1}


def test_default_log_reaches_the_engine_logger(caplog) -> None:
    """Without ``log=``, TSQ's layer-wise step logs through the ``lowbit.qat.engine`` logger (it called None)."""
    import logging

    fp, x, y = _data(16)
    kw = {k: v for k, v in TINY.items() if k != "log"}
    with caplog.at_level(logging.INFO, logger="lowbit.qat.engine"):
        lowbit.qat(fp, (x, y), method="tsq", **kw)
    assert any(r.getMessage().startswith("tsq step 2 ") for r in caplog.records)
