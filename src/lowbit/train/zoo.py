"""Training a zoo model on Fashion-MNIST and storing its checkpoint (``lowbit train``)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LowbitError
from .distillation import Ensemble
from .fp import TrainConfig, TrainResult, train_model
from .rng import private_global_rng


# torch 2.13's CPU convolution backward in channels_last corrupts the heap ("munmap_chunk(): invalid
# pointer", then a crash) for a dense convolution with 4 output channels, seen on an AVX2-only AMD EPYC
# host (ResNet-20 at width 4; widths 8 and 16 train). Such small models gain nothing from the layout.
MIN_CHANNELS_LAST_CHANNELS = 8


def channels_last_is_safe(model: nn.Module) -> bool:
    """Whether CPU training may switch ``model`` to channels_last: no dense conv under 8 output channels."""
    return not any(isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels < MIN_CHANNELS_LAST_CHANNELS
                   for m in model.modules())


def train_zoo_model(name: str, cfg: TrainConfig, data_root: str | None = None, save: bool = True,
                    progress: bool | None = None, log: Callable[[str], Any] | None = None, resume: bool = False,
                    teachers: tuple[str, ...] = (), checkpoint: str | None = None, stop_after: int | None = None,
                    out: str | Path | None = None, **model_kwargs) -> tuple[nn.Module, TrainResult]:
    """Train zoo model ``name`` on Fashion-MNIST and (with ``save``) store the trained weights.

    ``out``: the ``.safetensors`` file written (its JSON record beside it); by default
    ``lowbit.models.zoo.user_checkpoint_path(name)`` in the user's cache, never the package:
    replacing a shipped checkpoint takes ``out=lowbit.models.zoo.pretrained_path(name)``.

    With ``resume`` the shipped checkpoint is the starting point (a fresh schedule of ``cfg.epochs``
    epochs, typically with a smaller ``lr``), and the stored metadata keeps the earlier runs.
    ``teachers`` names shipped zoo checkpoints whose averaged predictions are distilled
    (``cfg.kd_weight``); their copies are loaded before training starts, so ``name`` may be one.
    ``checkpoint`` / ``stop_after``: see ``train_model``; a run stopped early stores nothing.
    """
    from ..data import load_fashion_mnist
    from ..models import create_model
    from ..models.zoo import checkpoint_destination, save_pretrained

    out = checkpoint_destination(name, out) if save else None  # a bad path fails now, not after training
    x_train, y_train = load_fashion_mnist("train", data_root)
    x_test, y_test = load_fashion_mnist("test", data_root)
    teacher = None
    if teachers:
        from ..models.zoo import load_pretrained as _load

        teacher = Ensemble([_load(t) for t in teachers])
    elif cfg.kd_weight > 0:
        raise LowbitError("train: kd_weight > 0 needs teachers (zoo model names)")
    earlier: list[dict] = []
    if resume:
        from ..models.zoo import load_pretrained, pretrained_info

        previous = pretrained_info(name)
        if model_kwargs and model_kwargs != previous.get("kwargs", {}):
            raise LowbitError(f"--resume: {name} checkpoint was built with {previous.get('kwargs')}, not {model_kwargs}")
        model_kwargs = previous.get("kwargs", {})
        model = load_pretrained(name).train()
        earlier = previous.get("runs", []) or [{k: v for k, v in previous.items() if k not in ("name", "kwargs", "dataset")}]
    else:
        with private_global_rng(cfg.seed):  # initial weights from cfg.seed; the caller's RNG is left alone
            model = create_model(name, **model_kwargs)
    if cfg.device == "cpu" and channels_last_is_safe(model):
        model = model.to(memory_format=torch.channels_last)
    result = train_model(model, x_train, y_train, x_test, y_test, cfg, progress=progress, log=log, teacher=teacher,
                         checkpoint=checkpoint, stop_after=stop_after)
    model = model.to(memory_format=torch.contiguous_format)
    if save and result.finished:
        run = {"test_accuracy": round(result.test_accuracy, 2), "epochs": cfg.epochs,
               "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
               "seed": cfg.seed,
               "train_seconds": round(sum(e.get("seconds", 0.0) for e in result.history), 1),
               **({"teachers": list(teachers), "kd_weight": cfg.kd_weight, "kd_temperature": cfg.kd_temperature}
                  if teachers else {}),
               **({"swa_epochs": cfg.swa_epochs, "swa_lr": cfg.swa_lr, "swa_per_epoch": cfg.swa_per_epoch}
                  if cfg.swa_epochs else {}),
               "history": result.history}
        info = {"name": name, "kwargs": model_kwargs, "dataset": "fashion-mnist", **run}
        if earlier:
            info["epochs"] = sum(r["epochs"] for r in earlier) + cfg.epochs
            info["train_seconds"] = round(sum(r["train_seconds"] for r in earlier) + run["train_seconds"], 1)
            info["runs"] = earlier + [run]
        save_pretrained(model, name, info, path=out)
    return model, result
