"""QAT engine, LSQ and GDRQ: STE gradients, Scale-Clip, exact group/BN folding, resume, DDP, export."""
from __future__ import annotations

import functools

import os
import socket

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.graph.fold import find_conv_bn_pairs
from lowbit.graph.surgery import prepare
from lowbit.ptq.baselines import MseOptions, mse
from lowbit.qat.engine import QatConfig, lr_factor
from lowbit.train import Ensemble, distillation_loss
from lowbit.qat.bn import fold_steps_into_bn
from lowbit.qat.gdrq import GdrqOptions, ScaleClipAct, ScaleClipWeight, gdrq_setup, least_error_k
from lowbit.quant.layers import quant_layers
from lowbit.quant.quantizer import ActQuantizer, WeightQuantizer

from ..conftest import calib_tensor, make_model, rel_err, self_labelled


def _data(n: int = 64, seed: int = 0):
    return self_labelled("resnet20", n, seed)


def test_scale_clip_weight_threshold_and_ste() -> None:
    w = (torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    wq = WeightQuantizer(2, 8, "group", 4)
    sc = ScaleClipWeight(wq, k=2.0)
    out = sc(w)
    t = 2.0 * w.detach().abs().reshape(4, -1).mean(1)  # T per group of 2 filters
    step = t / 1  # 2-bit narrow range: qmax = 1
    rows = w.detach().reshape(4, -1)
    # forward: round to the step, clamp to the ternary codes (what the committed quantizer computes)
    expected = torch.clamp(torch.round(rows / step.view(4, 1)), -1, 1) * step.view(4, 1)
    assert torch.allclose(out.detach().reshape(4, -1), expected, rtol=0, atol=1e-6)
    out.sum().backward()
    # GDRQ's straight-through estimator: gradient exactly 1 inside [-T, T], exactly 0 outside it,
    # also in the half step beyond T that still rounds to the top code
    inside = rows.abs() <= t.view(4, 1)
    beyond = (rows.abs() > t.view(4, 1)) & (rows.abs() < 1.5 * step.view(4, 1))
    assert inside.any() and (~inside).any() and beyond.any()  # the data exercises every case
    assert torch.equal(w.grad.reshape(4, -1), inside.float())
    # the threshold follows the weights at every call
    with torch.no_grad():
        w.mul_(3)
    assert torch.allclose(sc.step(w), 3 * step)


@pytest.mark.parametrize("two_sided", [False, True])
def test_scale_clip_act_ste_is_inside_the_clip_range(two_sided: bool) -> None:
    bits = 4
    aq = ActQuantizer(bits, symmetric=two_sided)
    aq.set_range(-1.0 if two_sided else 0.0, 1.0)  # signed symmetric codes for a two-sided range
    assert aq.signed == two_sided
    sc = ScaleClipAct(aq, k=3.0, momentum=0.9, two_sided=two_sided)
    sc.start(2.0)  # T = 2
    sc.eval()
    x = torch.linspace(-3.0, 3.0, 6001, dtype=torch.float32).requires_grad_()
    out = sc(x)
    scale, zp = sc.qparams()
    qmin, qmax = aq.qrange
    expected = (torch.clamp(torch.round(x.detach() / scale) + zp, qmin, qmax) - zp) * scale
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    lo = -2.0 if two_sided else 0.0
    inside = (x.detach() >= lo) & (x.detach() <= 2.0)
    step = scale.item()
    beyond = (x.detach() > 2.0) & (x.detach() < 2.0 + step / 2)
    assert beyond.any() and torch.equal(x.grad, inside.float())


def test_scale_clip_act_moving_average() -> None:
    aq = ActQuantizer(4)
    aq.set_range(0.0, 1.0)
    sc = ScaleClipAct(aq, k=3.0, momentum=0.9, two_sided=False)
    sc.train()
    x1 = torch.rand(1000)
    sc(x1)
    assert sc.threshold.item() == pytest.approx(3 * x1.abs().mean().item(), rel=1e-5)
    x2 = torch.rand(1000) * 4
    sc(x2)
    expected = 0.9 * 3 * x1.abs().mean() + 0.1 * 3 * x2.abs().mean()
    assert sc.threshold.item() == pytest.approx(expected.item(), rel=1e-5)
    sc.eval()
    before = sc.threshold.clone()
    out = sc(x2 * 100)
    assert torch.equal(sc.threshold, before)  # frozen at inference
    assert out.max().item() == pytest.approx(before.item(), rel=1e-5)  # clipped at T
    q = sc.commit()
    assert torch.allclose(q(x2 * 100), out) and torch.allclose(q(x2), sc(x2))


def test_per_layer_k_minimises_error_and_starts_at_the_mse_ranges() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    ternary, four = WeightQuantizer(2, 16, "group", 4), WeightQuantizer(4, 16, "group", 4)
    k2, k4 = least_error_k(ternary, w), least_error_k(four, w)
    assert 1.3 <= k2 <= 1.9 and k4 > k2  # ternary codes want a tight threshold, more bits a wider one
    err = lambda q, k: (ScaleClipWeight(q, k)(w) - w).pow(2).sum().item()  # noqa: E731
    assert err(ternary, k2) <= min(err(ternary, 1.0), err(ternary, 2.5))
    # default options: every activation threshold starts at the MSE start point's range
    fp, x, _ = _data(32)
    cfg = QuantConfig(w_bits=2, a_bits=4, fold_bn=False, progress=False)
    qmodel, _ = prepare(fp, cfg, x[:2])
    lowbit.record_of(qmodel).bn_pairs = find_conv_bn_pairs(fp)
    ref, _ = prepare(fp, cfg.with_(fold_bn=False), x[:2])
    mse(ref, x, cfg, MseOptions())
    gdrq_setup(qmodel, x, cfg, GdrqOptions())
    refs = dict(quant_layers(ref))
    checked = 0
    for name, layer in quant_layers(qmodel):
        if isinstance(layer.input_quant, ScaleClipAct) and not layer.input_quant.two_sided:
            scale, _ = layer.input_quant.qparams()
            assert torch.allclose(scale, refs[name].input_quant.scale, rtol=1e-4), name
            checked += 1
    scale_clipped = {f"{n}.weight" for n, l in quant_layers(qmodel) if isinstance(l.weight_quant, ScaleClipWeight)}
    assert checked > 5 and scale_clipped and scale_clipped <= set(lowbit.record_of(qmodel).gdrq_k)


def test_ste_gradients_of_learned_steps() -> None:
    from lowbit.quant.learnable import LearnedStepWeight

    w = torch.randn(4, 8, requires_grad=True)
    wq = WeightQuantizer(3, 4, "channel")
    wq.scale.fill_(0.2)
    lsq = LearnedStepWeight(wq, w)
    lsq(w).sum().backward()
    inside = (w.detach().abs() / 0.2).round() <= 3
    assert torch.equal(w.grad != 0, inside)  # straight through inside, zero when clipped
    assert lsq.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_steps_fold_into_bn_exactly(groups: int) -> None:
    fp = make_model("resnet20")
    x = calib_tensor(8)
    cfg = QuantConfig(w_bits=3, a_bits=None, granularity="group", groups=groups, fold_bn=False)
    qmodel, _ = prepare(fp, cfg, x[:2])
    lowbit.record_of(qmodel).bn_pairs = find_conv_bn_pairs(fp)
    gdrq_setup(qmodel, x, cfg, GdrqOptions())
    # BN in inference mode with trained-looking statistics; commit the Scale-Clip steps
    for _, layer in quant_layers(qmodel):
        if isinstance(layer.weight_quant, ScaleClipWeight):
            layer.weight_quant = layer.weight_quant.commit(layer)
    qmodel.eval()
    codes_before = {n: l.weight_quant.quantize(l.weight).int_value.clone() for n, l in quant_layers(qmodel)}
    with torch.no_grad():
        ref = qmodel(x)
    worst = fold_steps_into_bn(qmodel, lowbit.record_of(qmodel).bn_pairs, cfg)
    assert worst == 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    with torch.no_grad():
        assert rel_err(qmodel(x), ref) < 1e-5
    for n, l in quant_layers(qmodel):
        res = l.weight_quant.quantize(l.weight)
        assert l.weight_quant.num_groups == l.weight.shape[0]  # one multiplier per channel
        assert torch.equal(res.int_value.abs(), codes_before[n].abs())  # same integers
        assert (l.weight_quant.scale > 0).all()


def _qat(fp, x, y, **kw):
    base = dict(w_bits=2, a_bits=4, epochs=2, batch_size=16, lr=0.01, progress=False, log=lambda s: None)
    base.update(kw)
    return lowbit.qat(fp, (x, y), **base)


@pytest.mark.parametrize("method", ["lsq", "gdrq"])
def test_resume_gives_the_same_weights(method: str, tmp_path) -> None:
    fp, x, y = _data()
    # four runs: a 16-image MSE start (the setup every run repeats) keeps them cheap; resume is what is tested
    run = functools.partial(_qat, fp, x, y, method=method, calib_size=16)
    full = run()
    ckpt = tmp_path / "run.ckpt"
    part = run(checkpoint=str(ckpt), max_steps=3, checkpoint_every=2)
    assert not lowbit.record_of(part).qat["finished"] and ckpt.exists()
    part = run(checkpoint=str(ckpt), resume=True, max_steps=2)
    assert not lowbit.record_of(part).qat["finished"]
    done = run(checkpoint=str(ckpt), resume=True)
    for (n, a), b in zip(full.state_dict().items(), done.state_dict().values()):
        assert torch.equal(a, b), n
    assert done.lowbit_info["qat"]["history"] == full.lowbit_info["qat"]["history"] or all(
        {k: v for k, v in h.items() if k != "seconds"} == {k: v for k, v in g.items() if k != "seconds"}
        for h, g in zip(done.lowbit_info["qat"]["history"], full.lowbit_info["qat"]["history"]))


def test_resume_refuses_another_run(tmp_path) -> None:
    fp, x, y = _data()
    ckpt = tmp_path / "run.ckpt"
    _qat(fp, x, y, method="lsq", checkpoint=str(ckpt), max_steps=1, calib_size=16)
    with pytest.raises(LowbitError, match="different run"):
        _qat(fp, x, y, method="lsq", w_bits=3, checkpoint=str(ckpt), resume=True, calib_size=16)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(LowbitError, match="not a lowbit training checkpoint"):
        _qat(fp, x, y, method="lsq", checkpoint=str(ckpt), resume=True, calib_size=16)


@pytest.mark.parametrize("method", ["lsq", "gdrq"])
def test_qat_improves_on_ptq_and_round_trips(method: str, tmp_path) -> None:
    import onnxruntime  # noqa: F401
    from lowbit.deploy.onnx_qdq import onnx_predict, onnx_session

    fp, x, y = _data(128)
    before = [p.clone() for p in fp.parameters()]
    q = _qat(fp, x, y, method=method, epochs=3, log_dir=str(tmp_path / "log"), granularity="group", groups=2)
    assert all(torch.equal(a, b) for a, b in zip(before, fp.parameters()))  # FP model untouched
    ptq = lowbit.quantize(fp, x, 2, 4, method="mse", granularity="group", groups=2, progress=False)
    with torch.no_grad():
        acc_q = (q(x).argmax(1) == y).float().mean()
        acc_ptq = (ptq(x).argmax(1) == y).float().mean()
    assert acc_q >= acc_ptq
    for name in ("qat_log.csv", "qat_log.json", "qat_curve.png"):
        assert (tmp_path / "log" / name).stat().st_size > 0
    loaded = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), model=fp)
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), q(x).argmax(1))
        assert rel_err(loaded(x), q(x)) < 1e-5
    onnx_path = lowbit.export(q, tmp_path / "m.onnx")
    sess = onnx_session(onnx_path)
    with torch.no_grad():
        assert (onnx_predict(sess, x).argmax(1) == q(x).argmax(1)).float().mean() >= 0.98
    if method == "gdrq":  # groups merged into BN: no BN and no extra ops in the exported graph
        import onnx
        ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
        assert "BatchNormalization" not in ops and ops <= {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm",
                                                           "Relu", "Add", "GlobalAveragePool", "Flatten", "Clip",
                                                           "Reshape", "MatMul", "ReduceMean", "Cast"}


def test_lr_schedule_and_config_errors() -> None:
    cfg = QatConfig(warmup_steps=2)
    assert lr_factor(0, 10, cfg) == 0.5 and lr_factor(2, 10, cfg) == 1.0
    assert lr_factor(10, 10, cfg) == pytest.approx(0.0)
    for bad in ({"optimizer": "rmsprop"}, {"epochs": 0}, {"resume": True}, {"schedule": "step"}):
        with pytest.raises(LowbitError):
            QatConfig(**bad)
    fp, x, y = _data(8)
    with pytest.raises(LowbitError, match="unknown QAT method"):
        lowbit.qat(fp, (x, y), method="nope")
    with pytest.raises(LowbitError, match="labels"):
        lowbit.qat(fp, (x, y.float()), method="lsq")


def test_distillation_loss_follows_the_teacher_not_the_labels() -> None:
    fp, x, y = _data(64)
    with torch.no_grad():
        logits = fp(x)
    pure = distillation_loss(fp, 1.0, temperature=2.0)
    assert pure(logits, x, (y + 1) % 10).item() == pytest.approx(0.0, abs=1e-5)  # labels ignored
    half = distillation_loss(fp, 0.5)
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert half(logits, x, y).item() == pytest.approx(0.5 * ce.item(), rel=1e-4)
    # wrong labels: pure distillation still learns the teacher's function, cross-entropy does not
    wrong = (y + 1) % 10
    kd = _qat(fp, x, wrong, method="lsq", epochs=3, kd_weight=1.0)
    plain = _qat(fp, x, wrong, method="lsq", epochs=3)
    with torch.no_grad():
        agree_kd = (kd(x).argmax(1) == y).float().mean()
        agree_plain = (plain(x).argmax(1) == y).float().mean()
    assert agree_kd > 0.8 and agree_kd > agree_plain + 0.3
    assert kd.lowbit_info["qat"]["config"]["kd_weight"] == 1.0
    with pytest.raises(LowbitError, match="kd_weight"):
        QatConfig(kd_weight=1.5)
    with torch.no_grad():  # an ensemble of one is the model itself, as log-probabilities
        assert torch.allclose(Ensemble([fp])(x), logits.log_softmax(1), atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fp, x, y = _data(64)
    q = _qat(fp, x, y, method="lsq", epochs=1, batch_size=16, augment=False)
    torch.save({k: v.detach().clone() for k, v in q.state_dict().items()}, f"{out}.{rank}")
    import torch.distributed as dist
    dist.destroy_process_group()


def test_two_process_ddp_agrees_with_itself_and_one_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "state")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    s0, s1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    fp, x, y = _data(64)
    single = _qat(fp, x, y, method="lsq", epochs=1, batch_size=16, augment=False).state_dict()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k  # replicas stay identical
        # same as one process on the full batch (BN statistics span both processes); summation order
        # differs, so a few codes sitting on a rounding boundary may land one small step apart
        d = (s0[k].float() - single[k].float()).abs()
        assert (d > 1e-4).float().mean() < 0.1 and d.max() < 0.01, k


def test_zero_bn_multiplier_folds_to_zero_codes() -> None:
    torch.manual_seed(0)
    fp = lowbit.create_model("resnet20", width=4).eval()  # zero-initialised last BN of each block
    x = calib_tensor(8)
    cfg = QuantConfig(w_bits=2, a_bits=None, fold_bn=False)
    qmodel, _ = prepare(fp, cfg, x[:2])
    lowbit.record_of(qmodel).bn_pairs = find_conv_bn_pairs(fp)
    gdrq_setup(qmodel, x, cfg, GdrqOptions())
    for _, layer in quant_layers(qmodel):
        layer.weight_quant = layer.weight_quant.commit(layer)
    with torch.no_grad():
        ref = qmodel(x)
    fold_steps_into_bn(qmodel, lowbit.record_of(qmodel).bn_pairs, cfg)
    with torch.no_grad():
        assert rel_err(qmodel(x), ref) < 1e-5
    for _, l in quant_layers(qmodel):
        assert (l.weight_quant.scale > 0).all() and torch.isfinite(l.weight).all()
