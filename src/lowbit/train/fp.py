"""Floating-point training of any CNN on tensors (SGD + nesterov, warm-up and cosine schedule,
optional distillation and weight averaging), resumable from a checkpoint, CPU or CUDA."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LowbitError
from ..evaluate import accuracy
from ..progress import progress_bar
from .averaging import WeightAverage
from .checkpoints import load_checkpoint, parameter_shapes, restore_failed, save_checkpoint
from .distillation import distillation_loss
from .rng import private_global_rng

logger = logging.getLogger(__package__)  # "lowbit.train": the name users configure


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of FP training.

    ``kd_*``: distillation from a teacher (see ``distillation_loss``). ``swa_epochs`` > 0 ends the
    run with that many epochs at the constant rate ``swa_lr`` whose weights are averaged
    ``swa_per_epoch`` times an epoch (stochastic weight averaging, Izmailov et al. 2018); the
    average, with BN statistics recomputed on the training images, is the result.
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    augment: bool = True
    swa_epochs: int = 0
    swa_lr: float = 0.01
    swa_per_epoch: int = 4
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise LowbitError("train: epochs and batch_size must be >= 1")
        if not 0 <= self.swa_epochs <= self.epochs or self.swa_per_epoch < 1 or self.swa_lr <= 0:
            raise LowbitError(f"train: swa_epochs must be in [0, epochs={self.epochs}], "
                              "swa_per_epoch >= 1 and swa_lr > 0")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    test_accuracy: float = float("nan")
    finished: bool = True


def augment_batch(x: Tensor, gen: torch.Generator, pad: int = 2) -> Tensor:
    """Random shift (zero-padded crop) and horizontal flip, on whole batches, on device.

    Only images (N x C x H x W) are augmented; other inputs (e.g. N x C x L signals) pass unchanged.
    """
    if x.dim() != 4:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)



def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched, xb: Tensor, yb: Tensor,
               gen: torch.Generator, augment: bool, label_smoothing: float = 0.0,
               loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """One optimizer and scheduler step on a batch (augmented if asked); returns loss and logits.

    ``loss_fn(logits, inputs, labels)``, when given, replaces cross-entropy (it sees the augmented
    inputs, so a teacher can be run on the same images).
    """
    if augment:
        xb = augment_batch(xb, gen)
    logits = model(xb)
    if loss_fn is None:
        loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
    else:
        loss = loss_fn(logits, xb, yb)
    if not torch.isfinite(loss):  # stop before the step writes NaN into the weights (and a checkpoint)
        raise LowbitError(f"training diverged: the loss is {loss.item()}; lower the learning rate "
                          f"(lr, scale_lr) or check the data")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach(), logits.detach()


TRAIN_FORMAT = "lowbit-train-2"  # -2: the run record holds every setting and the parameter shapes

# Settings of TrainConfig that may change between the parts of a run: they do not change the numbers.
TRAIN_RESUMABLE = frozenset({"device"})


def train_model(model: nn.Module, x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None,
                y_test: Tensor | None = None, cfg: TrainConfig = TrainConfig(),
                progress: bool | None = None, log: Callable[[str], Any] | None = None,
                teacher: nn.Module | None = None, checkpoint: str | None = None,
                stop_after: int | None = None) -> TrainResult:
    """Train ``model`` in place with SGD + nesterov and a one-cycle-like cosine schedule.

    With ``cfg.kd_weight`` > 0, ``teacher`` (kept frozen, in eval mode) supplies soft targets.
    ``checkpoint``: the training state is written there after every epoch, and a run started with
    an existing file continues after its last epoch, ending exactly as an uninterrupted run would.
    ``stop_after``: return after that many epochs of this call (to continue later from ``checkpoint``);
    the result then has no ``test_accuracy``. ``progress``: True, False or None (auto, see
    ``lowbit.progress``). ``log``: where per-epoch lines go (default: the ``lowbit.train`` logger at INFO).
    """
    log = logger.info if log is None else log
    if stop_after is not None and (stop_after < 1 or checkpoint is None):
        raise LowbitError("train: stop_after must be >= 1 and needs a checkpoint to continue from")
    # Batch order and augmentation draw from a local generator. Dropout can only draw from torch's
    # global generators: they are forked for the run, seeded from cfg.seed (and saved in / restored
    # from the checkpoint, so a continued run draws the same masks), and the caller's state is
    # given back unchanged when training ends.
    with private_global_rng(cfg.seed, cfg.device):
        return _train_model(model, x_train, y_train, x_test, y_test, cfg, progress, log, teacher, checkpoint,
                            stop_after)


def _train_model(model: nn.Module, x_train: Tensor, y_train: Tensor, x_test: Tensor | None,
                 y_test: Tensor | None, cfg: TrainConfig, progress: bool | None, log: Callable[[str], Any],
                 teacher: nn.Module | None, checkpoint: str | None, stop_after: int | None) -> TrainResult:
    """``train_model`` on the private global RNG it set up."""
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    loss_fn = None
    if cfg.kd_weight > 0:
        if teacher is None:
            raise LowbitError("train: kd_weight > 0 needs a teacher model")
        teacher = teacher.to(device).eval().requires_grad_(False)
        loss_fn = distillation_loss(teacher, cfg.kd_weight, cfg.kd_temperature, cfg.label_smoothing)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))
    average = WeightAverage(model) if cfg.swa_epochs else None
    swa_start = (cfg.epochs - cfg.swa_epochs) * steps_per_epoch
    swa_every = max(1, steps_per_epoch // cfg.swa_per_epoch)
    result = TrainResult()
    first = 0
    ckpt = Path(checkpoint) if checkpoint else None
    # what must match for a checkpoint to be continued: every setting but TRAIN_RESUMABLE, the data
    # size and the model's tensors by name and shape
    run = {**{k: v for k, v in asdict(cfg).items() if k not in TRAIN_RESUMABLE}, "model": type(model).__name__,
           "train_images": len(x_train), "parameters": parameter_shapes(model)}
    if ckpt is not None and ckpt.exists():
        required: dict[str, type | tuple[type, ...]] = {
            "model": dict, "optimizer": dict, "scheduler": dict, "generator": Tensor, "torch_rng": Tensor,
            "epoch": int, "history": list}
        if average is not None:
            required.update(average_sums=dict, average_count=int)
        state = load_checkpoint(ckpt, run, TRAIN_FORMAT, required)
        if not 0 <= state["epoch"] <= cfg.epochs or len(state["history"]) != state["epoch"]:
            raise restore_failed(ckpt, ValueError(f"epoch {state['epoch']} of {cfg.epochs}"))
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])  # the private global RNG (see train_model)
            if device.type == "cuda" and isinstance(state.get("cuda_rng"), Tensor):
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            if average is not None:
                if set(state["average_sums"]) != set(average.sums):
                    raise KeyError("average_sums does not match the model's parameters")
                average.sums = {n: state["average_sums"][n].to(average.sums[n]) for n in average.sums}
                average.count = state["average_count"]
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
            raise restore_failed(ckpt, exc) from None
        first, result.history = state["epoch"], state["history"]
        log(f"continuing from {ckpt} after epoch {first}/{cfg.epochs}")
    for epoch in range(first, cfg.epochs):
        if stop_after is not None and epoch - first >= stop_after:
            log(f"stopped after epoch {epoch}/{cfg.epochs}; run again to continue from {ckpt}")
            model.eval()
            result.finished = False
            return result
        model.train()
        started = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        bar = progress_bar(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", enable=progress)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in bar:
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            loss, logits = train_step(model, opt, sched, xb, yb, gen, cfg.augment, cfg.label_smoothing, loss_fn)
            done = epoch * steps_per_epoch + step + 1
            if average is not None and done > swa_start and (done - swa_start) % swa_every == 0:
                average.add(model)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        entry = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": 100 * correct / seen,
                 "seconds": time.perf_counter() - started}
        if x_test is not None:
            entry["test_acc"] = accuracy(model, x_test, y_test, device=device)
        result.history.append(entry)
        log(_entry_text(entry))
        if ckpt is not None:
            save_checkpoint(ckpt, {"format": TRAIN_FORMAT, "run": run, "model": model.state_dict(),
                                   "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                                   **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                                   "epoch": epoch + 1, "history": result.history,
                                   **({"average_sums": average.sums, "average_count": average.count}
                                      if average is not None else {})})
    if average is not None:
        average.load_into(model, x_train, cfg.batch_size, device)
        entry = {"epoch": "swa", "averaged": average.count}
        if x_test is not None:
            entry["test_acc"] = accuracy(model, x_test, y_test, device=device)
        result.history.append(entry)
        log(_entry_text(entry))
    if result.history and "test_acc" in result.history[-1]:
        result.test_accuracy = result.history[-1]["test_acc"]
    model.eval()
    return result


def _entry_text(entry: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at each step: half-epoch linear warm-up, cosine decay, then SWA's constant.

    Without SWA the cosine reaches 0 at the last step; with it, the cosine ends at ``swa_lr`` when the
    averaged epochs begin (and a run that is all SWA holds ``swa_lr`` after the warm-up).
    """
    warmup = max(1, steps_per_epoch // 2)
    floor = cfg.swa_lr / cfg.lr if cfg.swa_epochs else 0.0
    decay_end = max(warmup + 1, (cfg.epochs - cfg.swa_epochs) * steps_per_epoch)
    all_swa = cfg.swa_epochs == cfg.epochs
    peak = floor if all_swa else 1.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup * peak
        if all_swa or step >= decay_end:
            return floor
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay_end - warmup)))

    return factor
