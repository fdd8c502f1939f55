"""QAT checkpoints: a resume must match the run it continues, and no checkpoint is replaced unasked."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.qat.engine import QAT_FIELDS, QAT_RESUMABLE, QatConfig

from ..conftest import calib_tensor, randomize_bn

BASE = dict(method="lsq", w_bits=2, a_bits=4, epochs=2, batch_size=16, lr=0.01, calib_size=16,
            progress=False, log=lambda s: None)


def tiny_cnn() -> nn.Module:
    """Three conv-BN-ReLU layers and a head: the middle conv is a body layer (a zoo model is 5x slower)."""
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))).eval()


@pytest.fixture(scope="module")
def task():
    fp = tiny_cnn()
    x = calib_tensor(32, seed=5)
    with torch.no_grad():
        y = fp(x).argmax(1)
    return fp, x, y


def _qat(task, data=None, **kw):
    fp, x, y = task
    return lowbit.qat(fp, data or (x, y), **{**BASE, **kw})


@pytest.fixture(scope="module")
def stopped(task, tmp_path_factory) -> bytes:
    """The bytes of a checkpoint of BASE stopped after one of its four steps."""
    ckpt = tmp_path_factory.mktemp("stopped") / "run.ckpt"
    q = _qat(task, checkpoint=str(ckpt), max_steps=1)
    assert not lowbit.record_of(q).qat["finished"]
    return ckpt.read_bytes()


def _copy(stopped: bytes, tmp_path: Path) -> Path:
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(stopped)
    return ckpt


# (changed options, the name and the old vs new values the refusal must show)
CHANGES = [
    ({"lr": 0.05}, ["lr: 0.01 vs 0.05"]),
    ({"optimizer": "adam"}, ["optimizer: 'sgd' vs 'adam'"]),  # was a KeyError: 'step' from Adam
    ({"epochs": 3}, ["epochs: 2 vs 3"]),
    ({"batch_size": 8}, ["batch_size: 16 vs 8"]),
    ({"schedule": "constant", "warmup_steps": 1}, ["schedule: 'cosine' vs 'constant'", "warmup_steps: 0 vs 1"]),
    ({"momentum": 0.5, "weight_decay": 0.0}, ["momentum: 0.9 vs 0.5", "weight_decay: 5e-05 vs 0.0"]),
    ({"scale_lr": 0.001}, ["scale_lr: None vs 0.001"]),
    ({"augment": False, "label_smoothing": 0.1}, ["augment: True vs False", "label_smoothing: 0.0 vs 0.1"]),
    ({"kd_weight": 0.5}, ["kd_weight: 0.0 vs 0.5"]),
    ({"w_bits": 3}, ["w_bits: 2 vs 3"]),
    ({"a_bits": None}, ["a_bits: 4 vs None"]),
    ({"seed": 1}, ["seed: 0 vs 1"]),
    ({"calib_size": 8}, ["calib_size: 16 vs 8"]),
    ({"grad_scale": False}, ["grad_scale: True vs False"]),  # a method option
    ({"method": "gdrq"}, ["method: 'lsq' vs 'gdrq'", "k_weight: (not recorded) vs None", "option.momentum"]),
    ({"granularity": "group", "groups": 2}, ["granularity: 'channel' vs 'group'", "groups: None vs 2",
                                             "parameters (shapes differ:"]),
]


@pytest.mark.parametrize("change,shown", CHANGES, ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_a_resume_with_other_settings_names_each_difference(task, stopped, tmp_path, change, shown) -> None:
    ckpt = _copy(stopped, tmp_path)
    with pytest.raises(LowbitError, match="different run") as err:
        _qat(task, checkpoint=str(ckpt), resume=True, **change)
    for text in shown:
        assert text in str(err.value)
    assert ckpt.read_bytes() == stopped  # untouched


def test_a_resume_on_other_data_is_refused(task, stopped, tmp_path) -> None:
    fp, x, y = task
    ckpt = _copy(stopped, tmp_path)
    with pytest.raises(LowbitError, match="train_size: 32 vs 24"):
        _qat(task, (x[:24], y[:24]), checkpoint=str(ckpt), resume=True)


def test_every_setting_that_shapes_training_is_recorded(task, stopped, tmp_path) -> None:
    run = torch.load(_copy(stopped, tmp_path), weights_only=True)["run"]
    for name in QAT_FIELDS - QAT_RESUMABLE:
        assert name in run, name
    for name in ("method", "w_bits", "a_bits", "granularity", "groups", "fold_bn", "first_last_bits",
                 "config.batch_size", "seed", "train_size", "grad_scale"):
        assert name in run, name
    assert run["parameters"] and all(isinstance(s, list) for s in run["parameters"].values())
    assert run["parameters"]["0.weight"] == [4, 1, 3, 3]


def test_settings_that_do_not_change_numbers_may_differ_on_resume(task, stopped, tmp_path) -> None:
    ckpt = _copy(stopped, tmp_path)
    whole = _qat(task)
    done = _qat(task, checkpoint=str(ckpt), resume=True, checkpoint_every=1, log_dir=str(tmp_path / "logs"),
                device="cpu", progress=False)
    assert done.lowbit_info["qat"]["finished"] and (tmp_path / "logs" / "qat_log.csv").exists()
    for (name, a), b in zip(whole.state_dict().items(), done.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_existing_checkpoint_is_not_replaced_unasked(task, stopped, tmp_path) -> None:
    ckpt = _copy(stopped, tmp_path)
    for kw in ({}, {"max_steps": 1}, {"lr": 0.5}):
        with pytest.raises(LowbitError, match=r"already exists.*resume=True.*overwrite=True"):
            _qat(task, checkpoint=str(ckpt), **kw)
        assert ckpt.read_bytes() == stopped
    with pytest.raises(LowbitError, match="exclude each other"):
        _qat(task, checkpoint=str(ckpt), resume=True, overwrite=True)
    assert ckpt.read_bytes() == stopped


def test_overwrite_starts_afresh(task, stopped, tmp_path) -> None:
    ckpt = _copy(stopped, tmp_path)
    q = _qat(task, checkpoint=str(ckpt), overwrite=True, lr=0.05, max_steps=2)
    assert lowbit.record_of(q).qat["steps"] == 2  # from step 0, not from the old checkpoint's step 1
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2 and state["run"]["lr"] == 0.05
    done = _qat(task, checkpoint=str(ckpt), resume=True, lr=0.05)  # the new run continues
    assert done.lowbit_info["qat"]["steps"] == 4
    assert QatConfig(checkpoint="x", overwrite=True).overwrite and not QatConfig().overwrite


def _damage(stopped: bytes, tmp_path: Path, edit) -> Path:
    ckpt = _copy(stopped, tmp_path)
    state = torch.load(ckpt, weights_only=True)
    edit(state)
    torch.save(state, ckpt)
    return ckpt


DAMAGE = {
    "missing step": (lambda s: s.pop("step"), "step is missing"),
    "missing model": (lambda s: s.pop("model"), "model is missing"),
    "step is text": (lambda s: s.update(step="1"), "step is not a int"),
    "step out of range": (lambda s: s.update(step=99), "cannot be restored"),
    "run is a list": (lambda s: s.update(run=[1]), "run is not a dict"),
    "no run": (lambda s: s.pop("run"), "run is missing"),
    "weights of another shape": (lambda s: s["model"].update({"0.weight": torch.zeros(2, 2)}), "cannot be restored"),
    "weights missing": (lambda s: s["model"].pop("0.weight"), "cannot be restored"),
    "optimizer state emptied": (lambda s: s.update(optimizer={}), "cannot be restored"),
    "running incomplete": (lambda s: s["running"].pop("seen"), "cannot be restored"),
    "an older format": (lambda s: s.update(format="lowbit-qat-1"), "lowbit-qat-1 checkpoint, not lowbit-qat-2"),
    "an FP training checkpoint": (lambda s: s.update(format="lowbit-train-2"), "lowbit-train-2 checkpoint"),
    "no format": (lambda s: s.pop("format"), "not a lowbit training checkpoint"),
}


@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_a_lowbit_error(task, stopped, tmp_path, what: str) -> None:
    edit, message = DAMAGE[what]
    ckpt = _damage(stopped, tmp_path, edit)
    with pytest.raises(LowbitError, match=re.escape(message)):
        _qat(task, checkpoint=str(ckpt), resume=True)


@pytest.mark.parametrize("content", ["truncated", "empty", "text", "tensor", "list", "pickle"])
def test_a_truncated_or_foreign_file_is_a_lowbit_error(task, stopped, tmp_path, content: str) -> None:
    ckpt = tmp_path / "run.ckpt"
    if content == "truncated":
        ckpt.write_bytes(stopped[: len(stopped) // 2])
    elif content == "empty":
        ckpt.write_bytes(b"")
    elif content == "text":
        ckpt.write_text("step = 3\n")
    elif content == "tensor":
        torch.save(torch.zeros(3), ckpt)
    elif content == "list":
        torch.save([{"format": "lowbit-qat-2"}], ckpt)
    else:  # an object weights_only refuses to build (no code runs on load)
        torch.save({"format": "lowbit-qat-2", "run": Path("x")}, ckpt)
    with pytest.raises(LowbitError, match="not a lowbit training checkpoint"):
        _qat(task, checkpoint=str(ckpt), resume=True)
