"""The lowbit console script: each subcommand on a tiny model and synthetic Fashion-MNIST files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit.cli import main
from tests.data.test_data import make_fake_fmnist


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "fmnist"
    data.mkdir()
    make_fake_fmnist(data, n_test=40, n_train=64)
    torch.manual_seed(0)
    model = lowbit.create_model("resnet20", width=4)
    weights = tmp_path / "r20.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    common = ["--model", "resnet20", "--weights", str(weights), "--model-kwargs", '{"width": 4}',
              "--data", str(data), "--no-progress"]
    return tmp_path, common


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
    assert res["eval_images"] == 40 and 0 <= res["quant_top1"] <= 100
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

    manifest, _ = read_artifact(tmp / "g.lowbit")
    assert manifest["options"]["samples"] == 500
    assert {spec["num_groups"] for spec in manifest["layers"].values()} <= {1, 2}


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
    assert 0 <= res["quant_top1"] <= 100 and out.exists()
    assert (logs / "qat_log.csv").exists() and (logs / "qat_curve.png").exists()
    ev = run_json(capsys, ["eval", str(out), "--data", str(tmp / "fmnist"), "--no-progress"])
    assert ev["top1"] == res["quant_top1"]
    names = {(m["name"], m["kind"]) for m in run_json(capsys, ["methods"])["methods"]}
    assert {("lsq", "qat"), ("gdrq", "qat"), ("qdrop", "ptq"), ("distill", "ptq")} <= names
