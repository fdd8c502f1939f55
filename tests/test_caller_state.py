"""QAT and FP training leave the caller's state alone: global RNGs (CPU, CUDA) and matplotlib's backend."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import lowbit
from lowbit.train import TrainConfig, train_model

from .conftest import calib_tensor, randomize_bn

QUIET = {"progress": False, "log": lambda s: None}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _net(dropout: float = 0.3) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # the tests watch the global RNG: leave it alone here too
        torch.random.default_generator.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8, 10))
    return randomize_bn(net).eval()


def _data(n: int = 32):
    return calib_tensor(n, seed=4), torch.arange(n) % 10


def _qat(**kw) -> nn.Module:
    opts = {"method": "lsq", "w_bits": 2, "a_bits": 4, "epochs": 1, "batch_size": 16, "calib_size": 16, **QUIET}
    return lowbit.qat(_net(), _data(), **{**opts, **kw})


@contextmanager
def no_cuda_reseeding() -> Iterator[None]:
    """Fail if the block seeds or sets a CUDA generator (``torch.manual_seed`` reseeds every GPU, also
    on a machine without one: the call is queued for when CUDA starts)."""
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("manual_seed", "manual_seed_all", "set_rng_state", "set_rng_state_all"):
            patch.setattr(torch.cuda, name, lambda *a, _n=name, **k: calls.append(_n))
        yield
    assert calls == [], f"CUDA generators touched on a CPU run: {calls}"


def test_qat_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with no_cuda_reseeding():
        first = _qat()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)  # another caller state: the same result (dropout masks come from the seed)
    second = _qat()
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_qat_engine_leaves_the_callers_rng_alone() -> None:
    from lowbit.config import QuantConfig
    from lowbit.graph.surgery import prepare
    from lowbit.qat.engine import QatConfig, fit

    x, y = _data()
    qmodel, _ = prepare(_net(), QuantConfig(w_bits=4, a_bits=None), x[:2])
    before = torch.get_rng_state()
    with no_cuda_reseeding():
        fit(qmodel, x, y, None, QatConfig(epochs=1, batch_size=16), {}, 0, torch.device("cpu"), **QUIET)
    assert torch.equal(torch.get_rng_state(), before)


def test_qat_resume_with_dropout_matches_one_run(tmp_path) -> None:
    whole = _qat(epochs=2)
    ckpt = str(tmp_path / "run.ckpt")
    _qat(epochs=2, checkpoint=ckpt, max_steps=3)
    torch.manual_seed(99)
    done = _qat(epochs=2, checkpoint=ckpt, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), done.state_dict().values()):
        assert torch.equal(a, b), name


def test_train_model_leaves_the_callers_rng_alone() -> None:
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = _net().train()
    with no_cuda_reseeding():
        train_model(first, *_data(), cfg=cfg, **QUIET)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(5)
    second = _net().train()
    train_model(second, *_data(), cfg=cfg, **QUIET)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_qat_plot_keeps_the_callers_matplotlib_backend(tmp_path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    old = dict.__getitem__(matplotlib.rcParams, "backend")  # without resolving the automatic backend
    try:
        matplotlib.use("svg")
        _qat(log_dir=str(tmp_path / "logs"))
        assert matplotlib.get_backend() == "svg"
    finally:
        dict.__setitem__(matplotlib.rcParams, "backend", old)
    png = (tmp_path / "logs" / "qat_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


@cuda
def test_cuda_rng_of_the_caller_is_left_alone(tmp_path) -> None:
    torch.manual_seed(123)
    cpu, gpu = torch.get_rng_state(), torch.cuda.get_rng_state()
    train_model(_net().train(), *_data(), cfg=TrainConfig(epochs=1, batch_size=16, device="cuda"), **QUIET)
    _qat(device="cuda")
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(), gpu)


@cuda
def test_cuda_training_continues_from_a_checkpoint_exactly(tmp_path) -> None:
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, swa_epochs=1, swa_per_epoch=2, device="cuda")
    whole = _net().train()
    train_model(whole, *_data(), cfg=cfg, **QUIET)
    ckpt = str(tmp_path / "run.pt")
    parts = _net().train()
    train_model(parts, *_data(), cfg=cfg, checkpoint=ckpt, stop_after=1, **QUIET)
    parts = _net().train()
    train_model(parts, *_data(), cfg=cfg, checkpoint=ckpt, **QUIET)  # SWA sums and dropout state on the GPU
    for (name, a), b in zip(whole.state_dict().items(), parts.state_dict().values()):
        assert torch.equal(a, b), name
