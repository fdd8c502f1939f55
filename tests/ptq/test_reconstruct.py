"""Block reconstruction (brecq, qdrop) and two-stage distillation: losses fall, switches work, round trips."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.ptq.reconstruct import BRECQ_INIT, QDROP_INIT, ReconOptions, beta_at
from lowbit.quant.quantizer import effective_groups

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
    # the start each method reconstructs from: asymmetric weights (their default, as published),
    # Lp clipping with p = 2.4, and for qdrop the joint width / zero-point search
    start = {"brecq": BRECQ_INIT, "qdrop": QDROP_INIT}[method]
    base = lowbit.quantize(fp, calib, 2, 4, method="mse", w_symmetric=False, progress=False, **asdict(start))
    q = lowbit.quantize(fp, calib, 2, 4, method=method, iters=80, progress=False)
    assert q.lowbit_info["config"]["w_symmetric"] is False
    assert _output_error(q, fp, held) < 0.8 * _output_error(base, fp, held)
    assert all(torch.equal(a, b) for a, b in zip(before, fp.parameters()))  # FP model untouched
    report = lowbit.record_of(q).reconstruction
    assert [r["block"] for r in report] == ["conv1", *(f"layers.{i}.{j}" for i in range(3) for j in range(3)), "fc"]
    # the 8-bit first layer sees the FP input: little to reconstruct, its loss is 8-bit rounding noise
    assert report[0]["first"] < 1e-5 * report[1]["first"] and report[0]["last"] < 1e-5 * report[1]["first"]
    # every 2-bit body block ends below where it started (mean loss over the first / last fifth of
    # the steps), and on average by more than 5%; the 8-bit head is left out: at 8 bits its
    # rounding has little to gain and QDrop's random masks move its loss by about 2% either way
    body = report[1:-1]
    assert all(r["last"] < r["first"] for r in body), [(r["block"], r["last"] / r["first"]) for r in body]
    assert sum(r["last"] / r["first"] for r in body) / len(body) < 0.95


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


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The quantized network as the stages leave it: weights and every quantizer's learned values."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, layer in lowbit.quant.layers.quant_layers(model):
        for what in ("weight_quant", "input_quant"):
            for pname, p in getattr(layer, what).named_parameters():  # trainable stand-ins (LSQ steps)
                state[f"{name}.{what}.{pname}"] = p.detach().clone()
    return state


@pytest.mark.parametrize("stages", [(40, 0), (0, 30), (40, 30)])
def test_distill_stages_reduce_error(stages, data, monkeypatch) -> None:
    from lowbit.ptq import distill

    calib, held = data
    fp = make_model("resnet20")
    # spy on the two stages: which run, in which order, and on what model
    calls: list[tuple[str, dict]] = []
    real_block, real_joint = distill.block_stage, distill.joint_stage

    def block_spy(qmodel, *args, **kwargs):
        out = real_block(qmodel, *args, **kwargs)
        calls.append(("block done", _snapshot(qmodel)))
        return out

    def joint_spy(qmodel, *args, **kwargs):
        calls.append(("joint start", _snapshot(qmodel)))
        return real_joint(qmodel, *args, **kwargs)

    monkeypatch.setattr(distill, "block_stage", block_spy)
    monkeypatch.setattr(distill, "joint_stage", joint_spy)
    base = lowbit.quantize(fp, calib, 2, 4, method="mse", progress=False, granularity="group", groups=2)
    q = lowbit.quantize(fp, calib, 2, 4, method="distill", block_iters=stages[0], joint_iters=stages[1],
                        granularity="group", groups=2, lr=1e-3, progress=False)
    # block-wise fits features, the joint stage softmax outputs: check what each optimises (held-out images)
    metric = _kl if stages[1] else _output_error
    assert metric(q, fp, held) < metric(base, fp, held)
    # block-wise first, then joint, each once and only when switched on; the joint stage starts
    # from exactly what the block-wise stage left
    expected = [name for name, n in zip(("block done", "joint start"), stages) if n]
    assert [name for name, _ in calls] == expected
    if len(calls) == 2:
        after_block, joint_start = calls[0][1], calls[1][1]
        assert after_block.keys() == joint_start.keys()
        assert all(torch.equal(after_block[k], joint_start[k]) for k in after_block)
    report = lowbit.record_of(q).reconstruction
    n_blocks = 11 if stages[0] else 0  # conv1, nine residual blocks, fc
    assert [r["stage"] for r in report] == ["block"] * n_blocks + (["joint"] if stages[1] else [])
    for r in report:
        if r["stage"] == "block" and r["block"] != "conv1":
            assert r["last"] < r["first"]


@pytest.mark.parametrize("name", ["mobilenetv2", "zoofree", "untraceable"])
def test_distill_keeps_group_scales_and_round_trips(name: str, data, tmp_path) -> None:
    calib, held = data
    fp = make_model(name)
    q = lowbit.quantize(fp, calib, 4, 4, method="distill", block_iters=10, joint_iters=10,
                        granularity="group", groups=4, progress=False)
    fewer_than_channels = 0
    for lname, layer in lowbit.quant.layers.quant_layers(q):
        wq = layer.weight_quant
        channels = layer.weight.shape[0]
        # the group count the config asks for (largest divisor of the channels up to 4) ...
        assert wq.num_groups == effective_groups(channels, "group", 4) == max(
            g for g in range(1, 5) if channels % g == 0), lname
        # ... with that many distinct learned steps, each shared by a run of consecutive channels
        assert wq.scale.shape == (wq.num_groups,) and len(wq.scale.unique()) == wq.num_groups, lname
        per_channel, _ = wq.channel_params(layer.weight.dim())
        assert torch.equal(per_channel.flatten(), wq.scale.repeat_interleave(channels // wq.num_groups)), lname
        fewer_than_channels += wq.num_groups < channels
    assert fewer_than_channels >= 2  # not per-channel scales under another name
    loaded = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), model=fp)
    with torch.no_grad():
        assert torch.allclose(loaded(held), q(held), atol=1e-5)


def test_untraceable_model_reconstructs_with_unfolded_bn(data) -> None:
    calib, held = data
    fp = make_model("untraceable")
    base = lowbit.quantize(fp, calib, 3, 4, method="mse", w_symmetric=False, progress=False, **asdict(QDROP_INIT))
    q = lowbit.quantize(fp, calib, 3, 4, method="qdrop", iters=60, progress=False)
    assert _output_error(q, fp, held) < _output_error(base, fp, held)
