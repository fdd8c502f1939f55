"""FP training: the loop learns, distillation follows its teacher, bad settings are refused."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.train import Ensemble, TrainConfig, train_model

from .conftest import calib_tensor


def _task(n: int = 96):
    torch.manual_seed(0)
    teacher = lowbit.create_model("resnet20", width=4).eval()
    x = calib_tensor(n, seed=3)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return teacher, x, y


def test_training_fits_the_labels() -> None:
    _, x, y = _task()
    torch.manual_seed(1)
    student = lowbit.create_model("resnet20", width=4)
    cfg = TrainConfig(epochs=6, batch_size=32, lr=0.05, augment=False)
    result = train_model(student, x, y, x, y, cfg, progress=False, log=lambda s: None)
    assert len(result.history) == 6
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.test_accuracy > 50.0


def test_distillation_learns_the_teacher_despite_wrong_labels() -> None:
    teacher, x, y = _task()
    wrong = (y + 3) % 10
    cfg = TrainConfig(epochs=6, batch_size=32, lr=0.05, augment=False, kd_weight=1.0, kd_temperature=2.0)
    accs = {}
    for kd in (True, False):
        torch.manual_seed(1)
        student = lowbit.create_model("resnet20", width=4)
        run_cfg = cfg if kd else TrainConfig(**{**cfg.__dict__, "kd_weight": 0.0})
        train_model(student, x, wrong, cfg=run_cfg, progress=False, log=lambda s: None,
                    teacher=Ensemble([teacher]) if kd else None)
        with torch.no_grad():
            accs[kd] = (student.eval()(x).argmax(1) == y).float().mean().item()
    assert accs[True] > accs[False] + 0.2
    assert all(not p.requires_grad for p in teacher.parameters())  # frozen, never updated


def test_distillation_needs_a_teacher_and_sane_weights() -> None:
    _, x, y = _task(8)
    student = lowbit.create_model("resnet20", width=4)
    with pytest.raises(LowbitError, match="teacher"):
        train_model(student, x, y, cfg=TrainConfig(epochs=1, kd_weight=0.5), progress=False, log=lambda s: None)
    with pytest.raises(LowbitError, match="weight"):
        train_model(student, x, y, cfg=TrainConfig(epochs=1, kd_weight=2.0), progress=False, log=lambda s: None,
                    teacher=student)
    with pytest.raises(LowbitError, match="at least one"):
        Ensemble([])
