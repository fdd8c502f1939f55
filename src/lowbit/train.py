"""Floating-point training of zoo models (Fashion-MNIST or any tensors), CPU or CUDA."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LowbitError
from .evaluate import accuracy
from .files import atomic_write
from .progress import progress_bar

logger = logging.getLogger(__name__)


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


@contextmanager
def private_global_rng(seed: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block on torch's global RNG, seeded with ``seed``, and give the caller's state back after.

    Layers such as dropout and weight initialisers draw from the global generators (the CPU one,
    and on a GPU the generator of that device), which cannot be handed a ``torch.Generator``. This
    forks exactly those (``fork_rng`` restores them on exit, also on an exception), so seeded,
    reproducible training leaves the caller's random state as it was. ``seed`` None: fork only.
    """
    device = torch.device(device)
    cuda = [_cuda_index(device)] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            seed_global_rng(seed, device)
        yield


def seed_global_rng(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed the global CPU generator and, for a CUDA ``device``, that device's generator only.

    ``torch.manual_seed`` would reseed every CUDA device, including ones ``private_global_rng``
    did not fork, so it is not used here.
    """
    device = torch.device(device)
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(_cuda_index(device)):
            torch.cuda.manual_seed(seed)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def parameter_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every tensor in ``model.state_dict()`` (parameters and buffers)."""
    return {name: list(t.shape) for name, t in model.state_dict().items() if isinstance(t, Tensor)}


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic write: a temporary file in the same folder, then rename."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, run: dict, fmt: str, required: Mapping[str, type | tuple[type, ...]] | None = None,
                    start_over: str = "delete it or choose another path") -> dict:
    """A training-state file written by ``save_checkpoint`` for the same ``run``, else a LowbitError.

    Args:
        path: the checkpoint file.
        run: every setting that must match to continue (see ``run_differences``).
        fmt: the expected ``"format"`` entry.
        required: entries the state must have, with their types (a damaged or foreign file is
            refused here, not by a KeyError later).
        start_over: how the user starts a fresh run instead (part of the refusal message).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, damaged, not a torch file, or one holding arbitrary objects
        raise LowbitError(f"{path} is not a lowbit training checkpoint (damaged or another kind of file: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    found = state.get("format") if isinstance(state, dict) else None
    if not isinstance(found, str) or not found.startswith("lowbit-"):
        raise LowbitError(f"{path} is not a lowbit training checkpoint")
    if found != fmt:
        raise LowbitError(f"{path} is a {found} checkpoint, not {fmt} (another kind of run, or written by another "
                          f"lowbit version); {start_over}")
    problems = [f"{key} is missing" if key not in state else f"{key} is not a {_type_name(kind)}"
                for key, kind in {"run": dict, **(required or {})}.items()
                if key not in state or not _is_a(state[key], kind)]
    if problems:
        raise LowbitError(f"checkpoint {path} is damaged ({', '.join(problems)}); {start_over}")
    diff = run_differences(state["run"], run)
    if diff:
        raise LowbitError(f"checkpoint {path} belongs to a different run (checkpoint vs now: {'; '.join(diff)}); "
                          f"continue it with the same settings, or {start_over}")
    return state


def _is_a(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is int)  # True is no step count


def _type_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


_ABSENT = object()


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (a run record compares equal however it was stored)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run_differences(old: dict, new: dict) -> list[str]:
    """Each setting that differs between two run records, as ``"name: old vs new"``.

    The ``"parameters"`` entry (``parameter_shapes``) is summarised: the tensors that changed shape,
    appeared or disappeared, a few of each by name.
    """
    out = []
    old, new = _plain(old), _plain(new)
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == b:
            continue
        if key == "parameters" and isinstance(a, dict) and isinstance(b, dict):
            out.append(_shape_differences(a, b))
        else:
            out.append(f"{key}: {_show(a)} vs {_show(b)}")
    return out


def _show(value: Any) -> str:
    return "(not recorded)" if value is _ABSENT else repr(value)


def _shape_differences(old: dict, new: dict, few: int = 4) -> str:
    def names(keys: list[str]) -> str:
        return ", ".join(keys[:few]) + (f", ... ({len(keys)} in all)" if len(keys) > few else "")

    changed = [f"{k} {old[k]} vs {new[k]}" for k in old if k in new and old[k] != new[k]]
    parts = [f"shapes differ: {names(changed)}"] if changed else []
    if gone := [k for k in old if k not in new]:
        parts.append(f"only in the checkpoint: {names(gone)}")
    if added := [k for k in new if k not in old]:
        parts.append(f"only in the model now: {names(added)}")
    return f"parameters ({'; '.join(parts)})"


def restore_failed(path: Path, exc: Exception, start_over: str = "delete it or choose another path") -> LowbitError:
    """The error for a checkpoint whose entries do not fit the model, optimizer or schedule."""
    return LowbitError(f"checkpoint {path} is damaged and cannot be restored ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}); {start_over}")


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
    from .data import load_fashion_mnist
    from .models import create_model
    from .models.zoo import checkpoint_destination, save_pretrained

    out = checkpoint_destination(name, out) if save else None  # a bad path fails now, not after training
    x_train, y_train = load_fashion_mnist("train", data_root)
    x_test, y_test = load_fashion_mnist("test", data_root)
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
        with private_global_rng(cfg.seed):  # initial weights from cfg.seed; the caller's RNG is left alone
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
