"""``lowbit inspect`` and ``lowbit eval`` on the artifact of a multi-bit (DMBQ) model."""
from __future__ import annotations

import json

import torch

import lowbit
from lowbit.cli import main
from lowbit.data import load_fashion_mnist
from tests.data.test_data import make_fake_fmnist
from tests.deploy.test_dmbq_export import LEGACY


def test_inspect_and_eval_read_a_multibit_artifact(tmp_path, capsys) -> None:
    path = lowbit.export(lowbit.load(LEGACY), tmp_path / "dmbq.lowbit")  # a version-4 file
    q = lowbit.load(path)
    assert main(["inspect", str(path), "--json"]) == 0  # the artifact names its zoo architecture
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == lowbit.summary(q).to_dict()["layers"]
    assert out["totals"]["pruned_channels"] >= 1 and out["totals"]["avg_w_bits"] < 8
    data = tmp_path / "fmnist"
    data.mkdir()
    make_fake_fmnist(data, n_test=12, n_train=None)
    assert main(["eval", str(path), "--data", str(data), "--no-progress", "--json"]) == 0
    x, y = load_fashion_mnist("test", data)
    with torch.no_grad():
        expected = round(100.0 * (q(x).argmax(1) == y).double().mean().item(), 2)
    assert json.loads(capsys.readouterr().out)["top1"] == expected
