"""FP training checkpoints (``train_model(checkpoint=...)``): same run or a named refusal, never a KeyError."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.train import TRAIN_FORMAT, TrainConfig, train_model

from .conftest import calib_tensor

QUIET = {"progress": False, "log": lambda s: None}
CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05, swa_epochs=1, swa_per_epoch=2)


def _net(width: int = 4) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.2),
                         nn.Conv2d(width, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


def _data(n: int = 32):
    x = calib_tensor(n, seed=3)
    return x, torch.arange(n) % 10


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> bytes:
    ckpt = tmp_path_factory.mktemp("train") / "run.pt"
    result = train_model(_net(), *_data(), cfg=CFG, checkpoint=str(ckpt), stop_after=1, **QUIET)
    assert not result.finished
    return ckpt.read_bytes()


def _copy(stopped: bytes, tmp_path: Path, edit=None) -> Path:
    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(stopped)
    if edit is not None:
        state = torch.load(ckpt, weights_only=True)
        edit(state)
        torch.save(state, ckpt)
    return ckpt


def test_other_settings_are_named_old_vs_new(stopped, tmp_path) -> None:
    ckpt = _copy(stopped, tmp_path)
    other = TrainConfig(**{**CFG.__dict__, "lr": 0.1, "momentum": 0.5, "swa_lr": 0.02})
    with pytest.raises(LowbitError, match="different run") as err:
        train_model(_net(), *_data(), cfg=other, checkpoint=str(ckpt), **QUIET)
    for text in ("lr: 0.05 vs 0.1", "momentum: 0.9 vs 0.5", "swa_lr: 0.01 vs 0.02"):
        assert text in str(err.value)
    with pytest.raises(LowbitError, match="train_images: 32 vs 24"):
        train_model(_net(), *[t[:24] for t in _data()], cfg=CFG, checkpoint=str(ckpt), **QUIET)
    assert ckpt.read_bytes() == stopped


def test_a_model_of_other_shapes_is_named_tensor_by_tensor(stopped, tmp_path) -> None:
    ckpt = _copy(stopped, tmp_path)
    with pytest.raises(LowbitError, match=r"parameters \(shapes differ: 0.weight \[4, 1, 3, 3\] vs \[6, 1, 3, 3\]"):
        train_model(_net(width=6), *_data(), cfg=CFG, checkpoint=str(ckpt), **QUIET)


def test_the_same_run_continues_to_the_uninterrupted_result(stopped, tmp_path) -> None:
    whole = _net()
    train_model(whole, *_data(), cfg=CFG, **QUIET)  # dropout draws too: same masks after the restart
    parts = _net()
    result = train_model(parts, *_data(), cfg=CFG, checkpoint=str(_copy(stopped, tmp_path)), **QUIET)
    assert result.finished and result.history[-1]["epoch"] == "swa"
    for (name, a), b in zip(whole.state_dict().items(), parts.state_dict().values()):
        assert torch.equal(a, b), name


DAMAGE = {
    "missing epoch": (lambda s: s.pop("epoch"), "epoch is missing"),  # was KeyError: 'epoch'
    "missing generator": (lambda s: s.pop("generator"), "generator is missing"),
    "missing average": (lambda s: s.pop("average_sums"), "average_sums is missing"),
    "epoch is a float": (lambda s: s.update(epoch=1.0), "epoch is not a int"),
    "epoch out of range": (lambda s: s.update(epoch=7), "cannot be restored"),
    "history too short": (lambda s: s.update(history=[]), "cannot be restored"),
    "generator state garbage": (lambda s: s.update(generator=torch.zeros(3)), "cannot be restored"),
    "weights of another shape": (lambda s: s["model"].update({"0.weight": torch.zeros(2)}), "cannot be restored"),
    "average of other tensors": (lambda s: s.update(average_sums={"x": torch.zeros(1)}), "cannot be restored"),
    "run is text": (lambda s: s.update(run="lr=0.05"), "run is not a dict"),
    "older format": (lambda s: s.update(format="lowbit-train-1"), f"lowbit-train-1 checkpoint, not {TRAIN_FORMAT}"),
    "a QAT checkpoint": (lambda s: s.update(format="lowbit-qat-2"), "lowbit-qat-2 checkpoint"),
}


@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_a_lowbit_error(stopped, tmp_path, what: str) -> None:
    edit, message = DAMAGE[what]
    ckpt = _copy(stopped, tmp_path, edit)
    with pytest.raises(LowbitError, match=re.escape(message)):
        train_model(_net(), *_data(), cfg=CFG, checkpoint=str(ckpt), **QUIET)


def test_a_truncated_file_is_a_lowbit_error(stopped, tmp_path) -> None:
    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(stopped[:len(stopped) // 3])
    with pytest.raises(LowbitError, match="not a lowbit training checkpoint"):
        train_model(_net(), *_data(), cfg=CFG, checkpoint=str(ckpt), **QUIET)
