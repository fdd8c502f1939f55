"""The lowbit console script: each subcommand on a tiny model and synthetic Fashion-MNIST files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.cli import main
from lowbit.quant.layers import quant_layers
from lowbit.quant.quantizer import effective_groups
from lowbit.data import load_fashion_mnist, sample_calibration
from tests.conftest import randomize_bn
from tests.data.test_data import make_fake_fmnist, write_idx


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "fmnist"
    data.mkdir()
    make_fake_fmnist(data, n_test=40, n_train=64)
    torch.manual_seed(0)
    # trained-looking BN statistics: a fresh ResNet's zero-initialised residual BN would fold into
    # all-zero conv weights, which have nothing to quantize
    model = randomize_bn(lowbit.create_model("resnet20", width=4), seed=1).eval()
    x_test, _ = load_fashion_mnist("test", data)
    _spread_predictions(model, x_test)
    # label every test image with the FP model's own prediction: FP top-1 is 100% by construction
    # and a quantized model's top-1 is its agreement with the FP model, a number that moves
    with torch.no_grad():
        labels = model(x_test).argmax(1)
    assert len(labels.unique()) >= 4  # the predictions are spread over classes, not one constant
    write_idx(data / "t10k-labels-idx1-ubyte.gz", labels.numpy())
    weights = tmp_path / "r20.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    common = ["--model", "resnet20", "--weights", str(weights), "--model-kwargs", '{"width": 4}',
              "--data", str(data), "--no-progress"]
    return tmp_path, common


@torch.no_grad()
def _spread_predictions(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Re-draw the head of an untrained model so its predictions spread over the classes.

    An untrained network maps every noise image to the same class (the bias wins), so accuracy
    would not tell one model from another; a head centred on the images' features does.
    """
    feats = []
    handle = model.fc.register_forward_hook(lambda _m, args, _out: feats.append(args[0]))
    model(images)
    handle.remove()
    f = feats[0]
    gen = torch.Generator().manual_seed(0)
    # standardised features times unit-variance weights / sqrt(features): logits of about unit spread
    w = torch.randn(model.fc.weight.shape, generator=gen) / f.std(0).clamp_min(1e-6) / f.shape[1] ** 0.5
    model.fc.weight.copy_(w)
    model.fc.bias.copy_(-(model.fc.weight @ f.mean(0)))


def _top1(model: torch.nn.Module, data) -> float:
    """Top-1 (%) on the test split, computed here rather than by lowbit.evaluate."""
    x, y = load_fashion_mnist("test", data)
    with torch.no_grad():
        return round(100.0 * (model(x).argmax(1) == y).double().mean().item(), 2)


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_methods_json(capsys) -> None:
    out = run_json(capsys, ["methods"])
    names = {m["name"] for m in out["methods"]}
    assert {"minmax", "mse", "aciq", "bitsplit"} <= names


def test_quantize_reports_accuracy_size_and_writes_artifact(setup, capsys) -> None:
    tmp, common = setup
    out_path = tmp / "q.lowbit"
    res = run_json(capsys, ["quantize", *common, "--w-bits", "4", "--a-bits", "4", "--method", "mse",
                            "--calib-size", "32", "--out", str(out_path)])
    assert res["eval_images"] == 40 and res["fp_top1"] == 100.0
    # the reported top-1 is the real one: the Python API's model from the same calibration images
    fp = lowbit.create_model("resnet20", width=4)
    fp.load_state_dict(load_file(str(tmp / "r20.safetensors")))
    x_train, _ = load_fashion_mnist("train", tmp / "fmnist")
    q = lowbit.quantize(fp.eval(), sample_calibration(x_train, 32, seed=0), w_bits=4, a_bits=4, method="mse",
                        calib_size=32, seed=0)
    expected = _top1(q, tmp / "fmnist")
    assert 0 < expected < 100  # W4A4 changes some predictions of this model, not all
    assert res["quant_top1"] == expected and res["drop"] == round(100.0 - expected, 2)
    assert _top1(lowbit.load(out_path, model=fp), tmp / "fmnist") == expected
    assert res["quantized_mb"] < res["fp32_mb"] and out_path.exists()
    ev = run_json(capsys, ["eval", str(out_path), "--data", str(tmp / "fmnist"), "--no-progress"])
    assert ev["top1"] == res["quant_top1"]


def test_export_weights_only_with_groups_and_method_option(setup, capsys) -> None:
    tmp, common = setup
    res = run_json(capsys, ["export", *common, "--w-bits", "3", "--a-bits", "fp", "--groups", "2",
                            "--method", "bitsplit", "--option", "samples=500", "--calib-size", "16",
                            "--out", str(tmp / "g.lowbit")])
    assert res["a_bits"] is None and "quant_top1" not in res
    from lowbit.deploy import read_artifact

    manifest, tensors = read_artifact(tmp / "g.lowbit")
    assert manifest["options"]["samples"] == 500
    loaded = dict(quant_layers(lowbit.load(tmp / "g.lowbit")))
    for name, spec in manifest["layers"].items():
        channels = spec["weight_shape"][0]
        assert channels > 2 and spec["granularity"] == "group"
        assert spec["num_groups"] == effective_groups(channels, "group", 2) == 2, name
        # two scales really fitted (not one repeated, not one per channel): per output channel,
        # exactly two distinct steps, each shared by a run of channels/2 consecutive channels
        scale = tensors[f"{name}.weight_quant.scale"]
        assert scale.shape == (2,) and len(scale.unique()) == 2, name
        per_channel, _ = loaded[name].weight_quant.channel_params(4)
        per_channel = per_channel.flatten()
        assert len(per_channel.unique()) == 2 < channels, name
        assert torch.equal(per_channel, scale.repeat_interleave(channels // 2)), name


def test_bad_input_is_a_clear_error(setup, capsys) -> None:
    _, common = setup
    assert main(["quantize", *common, "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["quantize", *common, "--w-bits", "0"]) == 2
    assert "w_bits must be an integer from 1 to 16" in capsys.readouterr().err
    assert main(["eval", "/nonexistent.lowbit"]) == 2
    assert "no artifact" in capsys.readouterr().err
    assert main(["export", *common]) == 2  # --out is required
    assert "required: --out" in capsys.readouterr().err


def test_qat_stops_resumes_logs_and_exports(setup, capsys) -> None:
    tmp, common = setup
    ckpt, logs, out = tmp / "q.ckpt", tmp / "logs", tmp / "qat.lowbit"
    args = ["qat", *common, "--method", "gdrq", "--w-bits", "2", "--a-bits", "4", "--groups", "2", "--epochs", "2",
            "--batch-size", "16", "--checkpoint", str(ckpt), "--log-dir", str(logs), "--calib-size", "32"]
    first = run_json(capsys, args + ["--max-steps", "3"])
    assert not first["finished"] and first["steps"] == 3 and ckpt.exists()
    res = run_json(capsys, args + ["--resume", "--out", str(out)])
    assert res["finished"] and res["steps"] == 8 and len(res["history"]) == 2
    assert res["eval_images"] == 40 and res["fp_top1"] == 100.0 and out.exists()
    # the reported top-1 is that of the model written to --out, computed independently here
    qat_top1 = _top1(lowbit.load(out), tmp / "fmnist")
    assert res["quant_top1"] == qat_top1 and res["drop"] == round(100.0 - qat_top1, 2)
    assert qat_top1 < 100  # W2A4 after 8 steps still differs from the FP model on some images
    assert (logs / "qat_log.csv").exists() and (logs / "qat_curve.png").exists()
    ev = run_json(capsys, ["eval", str(out), "--data", str(tmp / "fmnist"), "--no-progress"])
    assert ev["top1"] == res["quant_top1"]
    names = {(m["name"], m["kind"]) for m in run_json(capsys, ["methods"])["methods"]}
    assert {("lsq", "qat"), ("gdrq", "qat"), ("qdrop", "ptq"), ("distill", "ptq")} <= names
