"""``lowbit train`` writes to the user's folder or ``--out``, never over the shipped checkpoints by default."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.cli import main
from lowbit.models import zoo
from lowbit.train import TrainConfig, train_zoo_model
from tests.data.test_data import make_fake_fmnist

TINY = ["--model-kwargs", '{"width": 4}', "--epochs", "1", "--batch-size", "8", "--no-progress"]
SHIPPED = zoo.CHECKPOINT_DIR  # the real package folder, before any test replaces it


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Tiny data, a private LOWBIT_HOME, and the package folder replaced by a copy of resnet20's files.

    Writing into the copy is what the old code did (so the tests fail there without harming the
    real package); the real folder's bytes are checked unchanged afterwards as well.
    """
    data = tmp_path / "fmnist"
    data.mkdir()
    make_fake_fmnist(data, n_test=8, n_train=16)
    shipped = tmp_path / "package-checkpoints"
    shipped.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(zoo.pretrained_path("resnet20").with_suffix(suffix), shipped)
    real_before = _digests(SHIPPED)
    monkeypatch.setattr(zoo, "CHECKPOINT_DIR", shipped)
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path / "home"))
    yield {"data": str(data), "shipped": shipped, "home": tmp_path / "home", "tmp": tmp_path}
    assert _digests(SHIPPED) == real_before


def test_train_writes_to_the_user_folder_and_says_where(env, capsys) -> None:
    before = _digests(env["shipped"])
    assert main(["train", "resnet20", *TINY, "--data", env["data"], "--json"]) == 0
    assert _digests(env["shipped"]) == before
    out = json.loads(capsys.readouterr().out)
    expected = env["home"] / "checkpoints" / "resnet20_fmnist.safetensors"
    assert out["checkpoint"] == str(expected) and expected.is_file()
    record = json.loads(expected.with_suffix(".json").read_text())
    assert record["kwargs"] == {"width": 4} and record["epochs"] == 1
    assert _digests(env["shipped"]) == before
    # it loads back by path (constructor arguments from the record beside it), the shipped one by default
    mine = lowbit.load_pretrained("resnet20", weights=expected)
    saved = load_file(str(expected))
    assert all(torch.equal(v, saved[k]) for k, v in mine.state_dict().items())
    shipped = lowbit.load_pretrained("resnet20")
    assert shipped.lowbit_arch["kwargs"] == {} and shipped.fc.in_features == 64


def test_train_out_path_and_text_report(env, capsys) -> None:
    out_path = env["tmp"] / "mine" / "r20.safetensors"
    out_path.parent.mkdir()
    assert main(["train", "resnet20", *TINY, "--data", env["data"], "--out", str(out_path)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out_path}" in text and out_path.is_file() and out_path.with_suffix(".json").is_file()
    assert not (env["home"] / "checkpoints").exists()
    # the CLI takes the file back with --weights, its constructor arguments from the record
    assert main(["eval", "--model", "resnet20", "--weights", str(out_path), "--data", env["data"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 8


def test_no_save_writes_nothing(env, capsys) -> None:
    before = _digests(env["shipped"])
    assert main(["train", "resnet20", *TINY, "--data", env["data"], "--no-save", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] is None
    assert not env["home"].exists() and _digests(env["shipped"]) == before


def test_update_zoo_replaces_the_shipped_checkpoint(env, capsys) -> None:
    before = _digests(env["shipped"])
    assert main(["train", "resnet20", *TINY, "--data", env["data"], "--update-zoo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(env["shipped"] / "resnet20_fmnist.safetensors")
    assert _digests(env["shipped"]) != before
    assert zoo.pretrained_info("resnet20")["kwargs"] == {"width": 4}


def test_train_zoo_model_defaults_to_the_user_folder(env) -> None:
    before = _digests(env["shipped"])
    cfg = TrainConfig(epochs=1, batch_size=8, augment=False)
    train_zoo_model("resnet20", cfg, env["data"], progress=False, log=lambda s: None, width=4)
    assert _digests(env["shipped"]) == before
    assert (env["home"] / "checkpoints" / "resnet20_fmnist.safetensors").is_file()
    with pytest.raises(lowbit.LowbitError, match=r"\.safetensors"):  # refused before training, not after
        train_zoo_model("resnet20", cfg, "/nonexistent", out=env["tmp"] / "m.pt", width=4)


def test_user_checkpoint_folder_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path / "lb"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.user_checkpoint_dir() == tmp_path / "lb" / "checkpoints"
    monkeypatch.delenv("LOWBIT_HOME")
    assert zoo.user_checkpoint_path("resnet20") == tmp_path / "xdg" / "lowbit" / "checkpoints" / "resnet20_fmnist.safetensors"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.user_checkpoint_dir() == tmp_path / "home" / ".cache" / "lowbit" / "checkpoints"


def test_load_pretrained_weights_checks_the_record(tmp_path) -> None:
    torch.manual_seed(0)
    model = lowbit.create_model("resnet20", width=4)
    path = zoo.save_pretrained(model, "resnet20", {"name": "resnet20", "kwargs": {"width": 4}},
                               path=tmp_path / "r.safetensors")
    assert torch.equal(lowbit.load_pretrained("resnet20", weights=path).fc.weight, model.fc.weight)
    with pytest.raises(lowbit.LowbitError, match="holds a resnet20 checkpoint"):
        lowbit.load_pretrained("mobilenetv2", weights=path)
    with pytest.raises(lowbit.LowbitError, match="trained with model arguments"):
        lowbit.load_pretrained("resnet20", weights=path, model_kwargs={"width": 8})
