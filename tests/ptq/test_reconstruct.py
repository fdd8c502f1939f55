"""Block reconstruction (brecq, qdrop) and two-stage distillation: losses fall, switches work, round trips."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.ptq.reconstruct import ReconOptions, beta_at

from ..conftest import calib_tensor, make_model


def _output_error(q, fp, x) -> float:
    with torch.no_grad():
        return (q(x) - fp(x)).pow(2).mean().item()


def _kl(q, fp, x) -> float:
    with torch.no_grad():
        return torch.nn.functional.kl_div(q(x).log_softmax(1), fp(x).softmax(1), reduction="batchmean").item()


@pytest.fixture(scope="module")
def data():
    return calib_tensor(64, seed=1), calib_tensor(32, seed=2)


@pytest.mark.parametrize("method", ["brecq", "qdrop"])
def test_reconstruction_beats_its_mse_start(method: str, data) -> None:
    calib, held = data
    fp = make_model("resnet20")
    before = [p.clone() for p in fp.parameters()]
    base = lowbit.quantize(fp, calib, 2, 4, method="mse", progress=False)
    q = lowbit.quantize(fp, calib, 2, 4, method=method, iters=80, progress=False)
    assert _output_error(q, fp, held) < 0.8 * _output_error(base, fp, held)
    assert all(torch.equal(a, b) for a, b in zip(before, fp.parameters()))  # FP model untouched
    report = q.lowbit_recon
    assert len(report) == 11 and all(r["last"] <= r["first"] * 1.5 + 1e-6 for r in report)


def test_reconstructed_weights_are_on_the_grid_and_round_trip(data, tmp_path) -> None:
    calib, held = data
    fp = make_model("zoofree")
    q = lowbit.quantize(fp, calib, 3, 4, method="brecq", iters=30, progress=False)
    for _, layer in lowbit.quant.layers.quant_layers(q):
        res = layer.weight_quant.quantize(layer.weight)
        assert torch.allclose(res.value, layer.weight, atol=1e-6)
        qmin, qmax = layer.weight_quant.qrange
        assert res.int_value.min() >= qmin and res.int_value.max() <= qmax
    path = lowbit.export(q, tmp_path / "m.lowbit")
    loaded = lowbit.load(path, model=fp)
    with torch.no_grad():
        assert torch.allclose(loaded(held), q(held), atol=1e-5)


def test_beta_schedule() -> None:
    opts = ReconOptions(iters=100, warmup=0.2)
    assert beta_at(0, opts) is None and beta_at(19, opts) is None
    assert beta_at(20, opts) == pytest.approx(20.0)
    assert beta_at(99, opts) == pytest.approx(2.0, abs=0.3)


def test_reconstruction_option_errors(data) -> None:
    calib, _ = data
    fp = make_model("resnet20")
    with pytest.raises(LowbitError):
        lowbit.quantize(fp, calib, 4, 4, method="brecq", iters=0)
    with pytest.raises(LowbitError):
        lowbit.quantize(fp, calib, 4, 4, method="qdrop", drop_prob=1.5)
    with pytest.raises(LowbitError):
        lowbit.quantize(fp, calib, 4, 4, method="distill", lr=-1)


def test_reconstruction_with_disk_cache_matches_memory(data) -> None:
    calib, held = data
    fp = make_model("resnet20")
    a = lowbit.quantize(fp, calib, 4, 4, method="brecq", iters=10, progress=False)
    b = lowbit.quantize(fp, calib, 4, 4, method="brecq", iters=10, cache_mb=0, progress=False)
    with torch.no_grad():
        assert torch.allclose(a(held), b(held), atol=1e-5)


@pytest.mark.parametrize("stages", [(40, 0), (0, 60), (40, 60)])
def test_distill_stages_reduce_error(stages, data) -> None:
    calib, held = data
    fp = make_model("resnet20")
    base = lowbit.quantize(fp, calib, 2, 4, method="mse", progress=False, granularity="group", groups=2)
    q = lowbit.quantize(fp, calib, 2, 4, method="distill", block_iters=stages[0], joint_iters=stages[1],
                        granularity="group", groups=2, lr=1e-3, progress=False)
    # block-wise fits features, the joint stage softmax outputs: check what each optimises (held-out images)
    metric = _kl if stages[1] else _output_error
    assert metric(q, fp, held) < metric(base, fp, held)
    report = q.lowbit_recon
    assert {r["stage"] for r in report} == {s for s, n in zip(("block", "joint"), stages) if n}
    for r in report:
        if r["stage"] == "block" and r["block"] != "conv1":
            assert r["last"] < r["first"]


@pytest.mark.parametrize("name", ["mobilenetv2", "zoofree", "untraceable"])
def test_distill_keeps_group_scales_and_round_trips(name: str, data, tmp_path) -> None:
    calib, held = data
    fp = make_model(name)
    q = lowbit.quantize(fp, calib, 4, 4, method="distill", block_iters=10, joint_iters=10,
                        granularity="group", groups=4, progress=False)
    for _, layer in lowbit.quant.layers.quant_layers(q):
        wq = layer.weight_quant
        assert wq.scale.shape == (wq.num_groups,) and wq.num_groups <= 4
    loaded = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), model=fp)
    with torch.no_grad():
        assert torch.allclose(loaded(held), q(held), atol=1e-5)


def test_untraceable_model_reconstructs_with_unfolded_bn(data) -> None:
    calib, held = data
    fp = make_model("untraceable")
    base = lowbit.quantize(fp, calib, 3, 4, method="mse", progress=False)
    q = lowbit.quantize(fp, calib, 3, 4, method="qdrop", iters=60, progress=False)
    assert _output_error(q, fp, held) < _output_error(base, fp, held)
