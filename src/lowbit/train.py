"""Floating-point training of zoo models (Fashion-MNIST or any tensors), CPU or CUDA."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LowbitError
from .evaluate import accuracy
from .files import atomic_write
from .progress import progress_bar


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
    """Random shift (zero-padded crop) and horizontal flip, on whole batches, on device."""
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


def distillation_loss(teacher: nn.Module, weight: float, temperature: float = 1.0,
                      label_smoothing: float = 0.0) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``loss(logits, inputs, labels)``: ``weight`` x KL to ``teacher``'s logits + the rest cross-entropy.

    The KL term is scaled by ``temperature**2`` (Hinton et al.), so its gradients keep their size.
    The teacher runs under ``no_grad`` as it is (pass it in eval mode). With ``weight`` 1 the labels
    are never read.
    """
    if not 0.0 <= weight <= 1.0 or temperature <= 0:
        raise LowbitError("distillation: weight must be in [0, 1] and temperature > 0")

    def loss(logits: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(xb) / temperature, dim=1)
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="batchmean",
                      log_target=True) * temperature ** 2
        if weight >= 1.0:
            return kd
        return weight * kd + (1 - weight) * F.cross_entropy(logits, yb, label_smoothing=label_smoothing)

    return loss


class Ensemble(nn.Module):
    """Averages the softmax outputs of several models; returns log-probabilities (a distillation teacher)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise LowbitError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)

    def forward(self, x: Tensor) -> Tensor:
        logp = torch.stack([m(x).log_softmax(1) for m in self.members])
        return torch.logsumexp(logp, 0) - math.log(len(self.members))  # log of the mean probability


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
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach(), logits.detach()


TRAIN_FORMAT = "lowbit-train-1"


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic write: a temporary file in the same folder, then rename."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, run: dict, fmt: str) -> dict:
    """A training-state file written by ``save_checkpoint`` for the same ``run`` (else a LowbitError)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LowbitError(f"{path} is not a lowbit training checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise LowbitError(f"{path} is not a lowbit training checkpoint of this kind ({fmt})")
    if state["run"] != run:
        diff = {k: (state["run"].get(k), v) for k, v in run.items() if state["run"].get(k) != v}
        raise LowbitError(f"checkpoint {path} belongs to a different run (checkpoint vs now: {diff}); "
                          "delete it or choose another path")
    return state


def train_model(model: nn.Module, x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None,
                y_test: Tensor | None = None, cfg: TrainConfig = TrainConfig(), progress: bool = True,
                log=print, teacher: nn.Module | None = None, checkpoint: str | None = None,
                stop_after: int | None = None) -> TrainResult:
    """Train ``model`` in place with SGD + nesterov and a one-cycle-like cosine schedule.

    With ``cfg.kd_weight`` > 0, ``teacher`` (kept frozen, in eval mode) supplies soft targets.
    ``checkpoint``: the training state is written there after every epoch, and a run started with
    an existing file continues after its last epoch, ending exactly as an uninterrupted run would.
    ``stop_after``: return after that many epochs of this call (to continue later from ``checkpoint``);
    the result then has no ``test_accuracy``.
    """
    if stop_after is not None and (stop_after < 1 or checkpoint is None):
        raise LowbitError("train: stop_after must be >= 1 and needs a checkpoint to continue from")
    torch.manual_seed(cfg.seed)
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
    # what must match for a checkpoint to be continued (the device may change between parts)
    run = {**{k: v for k, v in asdict(cfg).items() if k != "device"}, "model": type(model).__name__,
           "train_images": len(x_train), "parameters": sum(p.numel() for p in model.parameters())}
    if ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt, run, TRAIN_FORMAT)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        first, result.history = state["epoch"], state["history"]
        if average is not None:
            average.sums, average.count = state["average_sums"], state["average_count"]
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


class WeightAverage:
    """Running mean of a model's parameters; BN statistics of the mean are recomputed, not averaged."""

    def __init__(self, model: nn.Module) -> None:
        self.sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
        self.count = 0

    @torch.no_grad()
    def add(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            self.sums[n] += p.detach().double()
        self.count += 1

    @torch.no_grad()
    def load_into(self, model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> None:
        """Copy the mean into ``model`` and re-estimate its BN running statistics on ``x`` (no augmentation)."""
        if self.count == 0:
            return
        for n, p in model.named_parameters():
            p.copy_((self.sums[n] / self.count).to(p.dtype))
        model.train()  # as torch.optim.swa_utils.update_bn: the whole model in training mode
        reestimate_bn(model, x, batch_size, device)
        model.eval()


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> int:
    """Recompute the running statistics of every BatchNorm in ``model`` on ``x``; returns their count.

    The statistics are the cumulative average over all batches. Only the BatchNorm layers switch to
    training mode (dropout and the rest keep what they had) and they end in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size].to(device))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        bn.eval()
    return len(bns)


def train_zoo_model(name: str, cfg: TrainConfig, data_root: str | None = None, save: bool = True,
                    progress: bool = True, log=print, resume: bool = False, teachers: tuple[str, ...] = (),
                    checkpoint: str | None = None, stop_after: int | None = None,
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
    from .data import load_fashion_mnist
    from .models import create_model
    from .models.zoo import checkpoint_destination, save_pretrained

    out = checkpoint_destination(name, out) if save else None  # a bad path fails now, not after training
    x_train, y_train = load_fashion_mnist("train", data_root)
    x_test, y_test = load_fashion_mnist("test", data_root)
    torch.manual_seed(cfg.seed)
    teacher = None
    if teachers:
        from .models.zoo import load_pretrained as _load

        teacher = Ensemble([_load(t) for t in teachers])
    elif cfg.kd_weight > 0:
        raise LowbitError("train: kd_weight > 0 needs teachers (zoo model names)")
    earlier: list[dict] = []
    if resume:
        from .models.zoo import load_pretrained, pretrained_info

        previous = pretrained_info(name)
        if model_kwargs and model_kwargs != previous.get("kwargs", {}):
            raise LowbitError(f"--resume: {name} checkpoint was built with {previous.get('kwargs')}, not {model_kwargs}")
        model_kwargs = previous.get("kwargs", {})
        model = load_pretrained(name).train()
        earlier = previous.get("runs", []) or [{k: v for k, v in previous.items() if k not in ("name", "kwargs", "dataset")}]
    else:
        model = create_model(name, **model_kwargs)
    if cfg.device == "cpu":
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
