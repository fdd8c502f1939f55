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


def test_schedule_without_swa_is_warmup_then_cosine_to_zero() -> None:
    from lowbit.train import lr_factor

    f = lr_factor(TrainConfig(epochs=4, lr=0.1), steps_per_epoch=10)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0)
    assert f(39) == pytest.approx(0.0, abs=0.01)
    assert all(f(s) >= f(s + 1) for s in range(4, 39))


def test_schedule_with_swa_holds_the_swa_rate() -> None:
    from lowbit.train import lr_factor

    f = lr_factor(TrainConfig(epochs=4, lr=0.1, swa_epochs=2, swa_lr=0.02), steps_per_epoch=10)
    assert f(4) == pytest.approx(1.0)
    assert [f(s) for s in range(20, 40)] == pytest.approx([0.2] * 20)
    assert f(19) > 0.2
    g = lr_factor(TrainConfig(epochs=3, lr=0.1, swa_epochs=3, swa_lr=0.02), steps_per_epoch=10)
    assert g(4) == pytest.approx(0.2) and g(29) == pytest.approx(0.2)


def test_swa_returns_the_mean_weights_with_fresh_bn_statistics() -> None:
    from lowbit.train import WeightAverage

    _, x, y = _task(64)
    torch.manual_seed(1)
    student = lowbit.create_model("resnet20", width=4)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, augment=False, swa_epochs=2, swa_lr=0.02, swa_per_epoch=2)
    snapshots = []
    orig_add = WeightAverage.add

    def spy(self, model):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        orig_add(self, model)

    WeightAverage.add = spy
    try:
        result = train_model(student, x, y, x, y, cfg, progress=False, log=lambda s: None)
    finally:
        WeightAverage.add = orig_add
    assert len(snapshots) == 4  # 2 epochs x 2 per epoch
    for n, p in student.named_parameters():
        assert torch.allclose(p, torch.stack([s[n] for s in snapshots]).mean(0), atol=1e-6)
    assert result.history[-1]["epoch"] == "swa" and result.test_accuracy == result.history[-1]["test_acc"]
    # BN statistics are those of the averaged model on the training images (recomputed, not averaged)
    bn = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))  # follows first_conv
    first_conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        h = first_conv(x)
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-4)


def test_swa_settings_are_checked() -> None:
    with pytest.raises(LowbitError, match="swa_epochs"):
        TrainConfig(epochs=2, swa_epochs=3)
    with pytest.raises(LowbitError, match="swa"):
        TrainConfig(epochs=2, swa_epochs=1, swa_lr=0.0)


def _three_epochs(tmp_path, **kw):
    _, x, y = _task(48)
    torch.manual_seed(1)
    student = lowbit.create_model("resnet20", width=4)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, swa_epochs=1, swa_per_epoch=2, **kw)
    return student, x, y, cfg


def test_a_run_stopped_and_continued_ends_exactly_like_one_run(tmp_path) -> None:
    quiet = {"progress": False, "log": lambda s: None}
    whole, x, y, cfg = _three_epochs(tmp_path)
    train_model(whole, x, y, cfg=cfg, **quiet)
    parts, *_ = _three_epochs(tmp_path)
    ckpt = tmp_path / "run.pt"
    first = train_model(parts, x, y, cfg=cfg, checkpoint=str(ckpt), stop_after=1, **quiet)
    assert not first.finished and len(first.history) == 1 and ckpt.exists()
    fresh, *_ = _three_epochs(tmp_path)  # a new process: a new model object, state from the file
    second = train_model(fresh, x, y, cfg=cfg, checkpoint=str(ckpt), stop_after=1, **quiet)
    assert [e["epoch"] for e in second.history] == [1, 2]
    fresh2, *_ = _three_epochs(tmp_path)
    last = train_model(fresh2, x, y, cfg=cfg, checkpoint=str(ckpt), **quiet)
    assert last.finished and last.history[-1]["epoch"] == "swa"
    for (n, a), b in zip(whole.state_dict().items(), fresh2.state_dict().values()):
        assert torch.equal(a, b), n


def test_a_checkpoint_of_another_run_is_refused(tmp_path) -> None:
    quiet = {"progress": False, "log": lambda s: None}
    model, x, y, cfg = _three_epochs(tmp_path)
    ckpt = tmp_path / "run.pt"
    train_model(model, x, y, cfg=cfg, checkpoint=str(ckpt), stop_after=1, **quiet)
    other = TrainConfig(**{**cfg.__dict__, "lr": 0.1})
    with pytest.raises(LowbitError, match="different run.*lr"):
        train_model(model, x, y, cfg=other, checkpoint=str(ckpt), **quiet)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(LowbitError, match="not a lowbit training checkpoint"):
        train_model(model, x, y, cfg=cfg, checkpoint=str(ckpt), **quiet)
    with pytest.raises(LowbitError, match="stop_after"):
        train_model(model, x, y, cfg=cfg, stop_after=1, **quiet)
