"""Quantization-aware training: the loop, exact resume, logs and plots, DistributedDataParallel.

Every source of randomness is derived from ``(seed, epoch)`` (batch order) or ``(seed, step)``
(augmentation, dropout), so a run stopped at any step and resumed from its checkpoint ends with
the same weights as one that never stopped. Under ``torchrun`` each process takes a slice of
every global batch and DDP averages the gradients (gloo on CPU, NCCL on GPU); only rank 0 writes.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import LowbitError
from ..evaluate import accuracy
from ..options import check_fields
from ..progress import progress_bar
from ..train.checkpoints import load_checkpoint, parameter_shapes, restore_failed, save_checkpoint
from ..train.distillation import distillation_loss
from ..train.fp import train_step
from ..train.rng import private_global_rng, seed_global_rng
from .bn import global_batch_norm

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class QatConfig:
    """Training hyper-parameters of QAT (quantization settings live in ``QuantConfig``).

    Attributes:
        epochs: passes over the training data.
        batch_size: global batch (split across processes under torchrun).
        optimizer: "sgd" (nesterov momentum) or "adam".
        lr: learning rate of weights and biases.
        scale_lr: learning rate of quantizer step sizes (default: ``lr``).
        momentum: SGD momentum.
        weight_decay: on weights only (not biases, BN or step sizes).
        schedule: "cosine" (to zero, after warm-up) or "constant".
        warmup_steps: linear learning-rate warm-up.
        label_smoothing: cross-entropy label smoothing.
        kd_weight: weight of the distillation loss to the FP model's logits (KL at
            ``kd_temperature``); the rest goes to cross-entropy. 0: plain cross-entropy, 1: pure KD.
        kd_temperature: softmax temperature of that loss.
        augment: random shifts and flips.
        checkpoint: file written every ``checkpoint_every`` steps and at each epoch end (atomic).
            It records every setting that shapes the training (``QAT_RESUMABLE`` and
            ``CONFIG_RESUMABLE`` list those that do not) and the model's tensor shapes. An
            existing file is never replaced silently: pass ``resume`` or ``overwrite``.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint`` when it exists (a fresh run when it does not). A
            checkpoint of a run with other settings is refused, naming each difference.
        overwrite: start afresh and replace an existing ``checkpoint``.
        log_dir: per-epoch log (CSV and JSON) and training-curve PNG.
        max_steps: stop this process after that many steps (checkpointed; resume later).
    """

    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    scale_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    augment: bool = True
    checkpoint: str | None = None
    checkpoint_every: int = 200
    resume: bool = False
    log_dir: str | None = None
    max_steps: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "QatConfig")  # declared types first: "3" is not an int
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise LowbitError("qat: epochs, batch_size and checkpoint_every must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise LowbitError(f"qat optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise LowbitError(f"qat schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0 or (self.scale_lr is not None and self.scale_lr < 0) or self.weight_decay < 0:
            raise LowbitError("qat: lr > 0, scale_lr >= 0 and weight_decay >= 0")
        if self.resume and not self.checkpoint:
            raise LowbitError("qat: resume needs a checkpoint path")
        if self.resume and self.overwrite:
            raise LowbitError("qat: resume (continue the checkpoint) and overwrite (replace it) exclude each other")
        if self.max_steps is not None and self.max_steps < 1:
            raise LowbitError("qat: max_steps must be >= 1")
        if not 0.0 <= self.kd_weight <= 1.0 or self.kd_temperature <= 0:
            raise LowbitError("qat: kd_weight must be in [0, 1] and kd_temperature > 0")


QAT_FIELDS = {f.name for f in fields(QatConfig)}

# QatConfig fields that may differ when a run is resumed: where and how often it is checkpointed,
# logged and stopped, none of which changes a number. Every other field must match the checkpoint.
QAT_RESUMABLE = frozenset({"checkpoint", "checkpoint_every", "resume", "overwrite", "log_dir", "max_steps"})
# QuantConfig fields that may differ on resume: the device (a run may move between CPU and GPU, or
# GPUs) and progress bars. Every other quantization setting must match.
CONFIG_RESUMABLE = frozenset({"device", "progress"})


def check_checkpoint_target(cfg: QatConfig) -> None:
    """Refuse to start a run that would replace an existing checkpoint without being told to."""
    if cfg.checkpoint and Path(cfg.checkpoint).exists() and not (cfg.resume or cfg.overwrite):
        raise LowbitError(f"qat: checkpoint {cfg.checkpoint} already exists; pass resume=True (--resume) to "
                          "continue it, or overwrite=True to start afresh and replace it (or delete it)")


@dataclass
class Distributed:
    """Process-group facts (world 1 when not launched by torchrun)."""

    world: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(1, 0, device)
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_world_size(), dist.get_rank(), device)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _is_quantizer_param(name: str) -> bool:
    return ".weight_quant." in name or ".input_quant." in name or name.startswith(("weight_quant.", "input_quant."))


def build_optimizer(model: nn.Module, cfg: QatConfig) -> torch.optim.Optimizer:
    """Weights with decay, biases/BN without, quantizer step sizes at ``scale_lr`` without decay."""
    decay, no_decay, scales = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _is_quantizer_param(name):
            scales.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    scale_lr = cfg.lr if cfg.scale_lr is None else cfg.scale_lr
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": scales, "weight_decay": 0.0, "lr": scale_lr}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def lr_factor(step: int, total: int, cfg: QatConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (warm-up, then cosine or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2 ** 63)


QAT_FORMAT = "lowbit-qat-2"  # -2: the run record holds every training setting and the tensor shapes
_START_OVER = "pass overwrite=True to start afresh (or choose another checkpoint path)"


class EpochLog:
    """Per-epoch history as CSV, JSON and a PNG of loss and accuracy curves."""

    def __init__(self, log_dir: str | None) -> None:
        self.dir = Path(log_dir) if log_dir else None

    def write(self, history: list[dict]) -> None:
        if self.dir is None or not history:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for h in history for k in h))
        with open(self.dir / "qat_log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        (self.dir / "qat_log.json").write_text(json.dumps(history, indent=1) + "\n")
        self.plot(history)

    def plot(self, history: list[dict]) -> None:
        # matplotlib's object API with the Agg canvas: neither pyplot's figure registry nor the
        # caller's backend (``matplotlib.use``) is touched
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            # the environment, not the caller's input: noted in the log, not a warning to fix
            logger.warning("matplotlib is not installed: no training-curve plot")
            return
        epochs = [h["epoch"] for h in history]
        fig = Figure(figsize=(9, 3.5))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("train loss")
        ax2.plot(epochs, [h["train_acc"] for h in history], marker="o", label="train")
        if any("val_acc" in h for h in history):
            ax2.plot(epochs, [h.get("val_acc", float("nan")) for h in history], marker="o", label="val")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("top-1 (%)")
        ax2.legend()
        fig.tight_layout()
        fig.savefig(self.dir / "qat_curve.png", dpi=100)


def fit(model: nn.Module, x_train: Tensor, y_train: Tensor, val: tuple[Tensor, Tensor] | None,
        cfg: QatConfig, run: dict, seed: int, device: torch.device, progress: bool | None = None,
        log: Callable[[str], Any] | None = None, teacher: nn.Module | None = None) -> dict:
    """Train ``model`` (its quantizers already in place) and return the run summary.

    ``run``: the settings outside ``cfg`` that a checkpoint must match to be resumed (method,
    quantization config, ...); the training settings, the data size and the model's tensor shapes
    are added here. ``teacher`` (an FP model in eval mode) is needed when ``cfg.kd_weight`` > 0.
    The caller's global RNG state is the same afterwards (see ``private_global_rng``).
    ``progress``: True, False or None (auto, see ``lowbit.progress``); ``log``: where per-epoch
    lines go (default: this module's logger at INFO).
    """
    log = logger.info if log is None else log
    check_checkpoint_target(cfg)
    dist = Distributed.from_env(device)
    model.to(dist.device)
    loss_fn = None
    if cfg.kd_weight > 0:
        if teacher is None:
            raise LowbitError("qat: kd_weight > 0 needs the FP teacher model")
        loss_fn = distillation_loss(teacher.to(dist.device).eval(), cfg.kd_weight, cfg.kd_temperature,
                                    cfg.label_smoothing)
    net: nn.Module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    opt = build_optimizer(model, cfg)
    n = len(x_train)
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg))
    step, history, running = 0, [], {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    run = {**run, **{k: v for k, v in asdict(cfg).items() if k not in QAT_RESUMABLE}, "seed": seed,
           "train_size": n, "parameters": parameter_shapes(model)}
    if cfg.resume and ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt, run, QAT_FORMAT, {"model": dict, "optimizer": dict, "scheduler": dict,
                                                        "step": int, "history": list, "running": dict},
                                start_over=_START_OVER)
        if not 0 <= state["step"] <= total or set(state["running"]) != set(running):
            raise restore_failed(ckpt, ValueError(f"step {state['step']} of {total}, running {state['running']}"),
                                 _START_OVER)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
            raise restore_failed(ckpt, exc, _START_OVER) from None
        step, history, running = state["step"], state["history"], state["running"]
        log(f"resumed from {ckpt} at step {step}/{total}")

    def checkpoint() -> None:
        if ckpt is not None and dist.main:
            save_checkpoint(ckpt, {"format": QAT_FORMAT, "run": run, "model": model.state_dict(),
                                   "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "step": step, "history": history, "running": running})
        dist.barrier()

    # BN statistics over the global batch under DDP, as one process would compute them. Dropout and
    # other layers draw from torch's global generators (CPU and this process's GPU), which cannot
    # take a torch.Generator: they are forked for the loop and reseeded from (seed, step) before
    # every step, so a resumed run draws the same masks, and the caller's state comes back unchanged.
    with global_batch_norm(model, dist.world > 1), private_global_rng(None, dist.device):
        epoch_log = EpochLog(cfg.log_dir if dist.main else None)
        ran = 0
        stopped = False
        while step < total and not stopped:
            epoch = step // per_epoch
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(seed, -1 - epoch)))
            net.train()
            start = time.perf_counter()
            bar = progress_bar(range(step % per_epoch, per_epoch), desc=f"qat epoch {epoch + 1}/{cfg.epochs}",
                               enable=progress if dist.main else False)
            for s in bar:
                idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size][dist.rank::dist.world]
                seed_global_rng(_step_seed(seed, step), dist.device)  # dropout and friends (see above)
                gen = torch.Generator().manual_seed(_step_seed(seed, step))
                xb, yb = x_train[idx].to(dist.device), y_train[idx].to(dist.device)
                loss, logits = train_step(net, opt, sched, xb, yb, gen, cfg.augment, cfg.label_smoothing, loss_fn)
                step += 1
                ran += 1
                running["loss"] += loss.item() * len(idx)
                running["correct"] += int((logits.argmax(1) == yb).sum())
                running["seen"] += len(idx)
                if s % 10 == 0:
                    bar.set_postfix(loss=f"{running['loss'] / running['seen']:.3f}",
                                    acc=f"{100 * running['correct'] / running['seen']:.1f}")
                if cfg.max_steps is not None and ran >= cfg.max_steps and step < total:
                    stopped = True
                    break
                if step % cfg.checkpoint_every == 0 and step % per_epoch:
                    running["seconds"] += time.perf_counter() - start
                    start = time.perf_counter()
                    checkpoint()
            running["seconds"] += time.perf_counter() - start
            if not stopped:
                entry = {"epoch": epoch + 1, "step": step, "lr": opt.param_groups[0]["lr"],
                         "train_loss": running["loss"] / max(1, running["seen"]),
                         "train_acc": 100 * running["correct"] / max(1, running["seen"]),
                         "seconds": running["seconds"]}
                if val is not None:
                    entry["val_acc"] = accuracy(model, val[0], val[1], device=dist.device)
                history.append(entry)
                running = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
                epoch_log.write(history)
            checkpoint()
    model.eval()
    return {"history": history, "steps": step, "total_steps": total, "finished": step >= total,
            "world_size": dist.world, "config": asdict(cfg)}
