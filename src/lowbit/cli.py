"""The ``lowbit`` command line: train, quantize, eval, export, qat, methods, models.

How failures end (``main``):

- **The user's error** -> one line ``lowbit: error: MESSAGE`` on stderr, exit status 2, and with
  ``--json`` also ``{"error": MESSAGE, "type": KIND, "exit_code": 2}`` on stdout. These are:
  usage errors (argparse, including the ``type=`` checks below: positive counts, bit widths, files
  that must exist, writable output paths, JSON objects), ``LowbitError`` (the library's exception
  for bad input), and ``OSError`` (files and folders named on the command line: missing,
  unreadable, unwritable, a directory, disk full), reported with its errno text and file name.
- **A bug in lowbit** (any other exception) -> ``lowbit: internal error: ...``, exit status 1, and
  a hint to rerun with ``LOWBIT_DEBUG=1``, which prints the traceback. Raw exceptions caused by user
  input (bad JSON, constructor arguments, weights that do not fit) are turned into ``LowbitError``
  where that input is read, not by a catch-all: a catch-all would blame the user for lowbit's bugs
  and hide the tracebacks needed to fix them.
- **Ctrl-C** -> ``lowbit: interrupted``, exit status 130 (128 + SIGINT, as shells report it).

Each command checks its arguments (names, options, files, output paths) before it loads data or
models, so a mistake is reported in a second rather than after a long calibration or training run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from .errors import LowbitError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130
DEBUG_VAR = "LOWBIT_DEBUG"


class UsageError(Exception):
    """A command-line usage error (raised by ``_Parser.error`` instead of exiting)."""

    def __init__(self, message: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors reach ``main`` (one error path for all failures, JSON included)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self)


# ------------------------------------------------------------------ argparse type= checks

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _at_least(value: int | float, low: int | float, strict: bool, text: str, what: str) -> int | float:
    """``value`` when it is above ``low`` (or equal, unless ``strict``); an argparse error naming ``what``."""
    if value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, epochs, steps)."""
    return _at_least(_int(text), 1, False, text, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _at_least(_int(text), 0, False, text, "an integer >= 0")


def seed_int(text: str) -> int:
    """A random seed: an integer in [0, 2**63)."""
    value = _int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"seed must be an integer from 0 to 2**63-1, got {value}")
    return value


def _bit_width(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"{name} must be an integer from 1 to 16, got {text!r}")
    return value


def w_bits(text: str) -> int:
    """Weight bits, 1..16."""
    return _bit_width(text, "w_bits")


def a_bits(text: str) -> int | None:
    """Activation bits, 1..16, or fp / float / none / 32 for weights only (None)."""
    if text.lower() in ("fp", "float", "none", "32"):
        return None
    return _bit_width(text, "a_bits (or 'fp')")


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, temperatures)."""
    return _at_least(_float(text), 0, True, text, "> 0")


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (weight decay)."""
    return _at_least(_float(text), 0, False, text, ">= 0")


def fraction(text: str) -> float:
    """A number in [0, 1] (loss weights)."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def device(text: str) -> str:
    """A torch device string that this machine has (cpu, cuda, cuda:N)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"device {text!r}: this machine has {count} CUDA device(s)")
    return text


def existing_file(text: str) -> str:
    """A path that is an existing file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file" if path.is_dir()
                                         else f"no such file: {text}")
    return text


def existing_dir(text: str) -> str:
    """A path that is an existing directory."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory" if path.exists()
                                         else f"no such directory: {text}")
    return text


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (constructor keyword arguments)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"width\": 4}}', got {text!r}")
    return value


def image_size(text: str) -> tuple[int, int]:
    """``N`` (square) or ``HxW``: the size images are resized to."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size N or HxW (e.g. 32 or 48x64), got {text!r}")
    return (values[0], values[-1])


def channel_count(text: str) -> int:
    """A channel count for images: 1 (gray), 2 (gray + alpha), 3 (RGB), 4 (RGBA)."""
    value = _int(text)
    if value not in (1, 2, 3, 4):
        raise argparse.ArgumentTypeError(f"must be 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA), got {value}")
    return value


def float_list(text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers, one per channel (``0.485,0.456,0.406``)."""
    return tuple(_float(part.strip()) for part in text.split(","))


def check_writable(path: str | os.PathLike, create_parent: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work is done.

    The target must not be a directory, and its folder must exist (``create_parent``: is created)
    and accept a new file (tried with a temporary file, which also catches read-only file systems
    and /proc-like folders that permission bits do not show). Raises LowbitError.
    """
    path = Path(path)
    if path.is_dir():
        raise LowbitError(f"cannot write {path}: it is a directory")
    parent = path.parent
    if create_parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LowbitError(f"cannot create the folder {parent}: {exc.strerror or exc}") from None
    if not parent.is_dir():
        raise LowbitError(f"cannot write {path}: " + (f"{parent} is not a directory" if parent.exists()
                                                       else f"the folder {parent} does not exist"))
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".lowbit-write-test-"):
            pass
    except OSError as exc:
        raise LowbitError(f"cannot write in {parent}: {exc.strerror or exc}") from None
    return path


def output_file(text: str) -> str:
    """An artifact path with a suffix ``lowbit.export`` writes, that can be written (see ``check_writable``)."""
    from .api import export_format

    try:
        export_format(text)
        check_writable(text)
    except LowbitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` -> (name, value), the value read as JSON when it is JSON (numbers, true, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--option NAME must be an option name, got {key!r} in {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# ------------------------------------------------------------------ shared helpers

def _progress(args: argparse.Namespace) -> bool:
    """``--progress`` / ``--no-progress`` when given, else on exactly when stderr is a terminal.

    The library's ``progress`` options take a bool, so the "auto" choice is made here.
    """
    flag = getattr(args, "progress", None)
    if flag is not None:
        return bool(flag)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def _emit(args: argparse.Namespace, result: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))


def _model_source(args: argparse.Namespace):
    """``--model`` parsed (a zoo name, file.py:factory or package.module:factory), checked before any work."""
    from .models.user import ModelSource

    return ModelSource(args.model)


def _load_fp_model(args: argparse.Namespace):
    """The FP model of ``--model``: a zoo model (shipped checkpoint or ``--weights``) or the user's own
    (``file.py:factory`` / ``package.module:factory`` with ``--model-kwargs``, ``--weights``)."""
    from .models.user import load_model

    return load_model(_model_source(args), args.model_kwargs, args.weights)


class _Input:
    """What a model expects as input, for reading image folders: channels, size, and the defaults.

    ``zoo``: lowbit's own Fashion-MNIST models (default 28 x 28 and the Fashion-MNIST statistics
    for 1-channel images, as always); ``channels`` / ``size``: known from the model's first layer,
    an artifact's or ONNX file's recorded input shape (None: unknown).
    """

    def __init__(self, zoo: bool, channels: int | None = None, size: tuple[int, int] | None = None,
                 what: str = "the model") -> None:
        self.zoo, self.channels, self.size, self.what = zoo, channels, size, what

    @classmethod
    def of_model(cls, model: Any, zoo: bool, what: str = "the model") -> "_Input":
        """From an FP model (first conv's input channels) or a quantized one (its calibration input shape)."""
        info = getattr(model, "lowbit_info", None) or {}
        shape = info.get("input_shape")
        if isinstance(shape, (list, tuple)) and len(shape) == 3:
            return cls(zoo, int(shape[0]), (int(shape[1]), int(shape[2])), what)
        return cls(zoo, _first_layer_channels(model), (28, 28) if zoo else None, what)


def _first_layer_channels(model: Any) -> int | None:
    """Input channels of the model's first conv (in module order), or None when it has none."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            return int(module.in_channels)
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            return None  # not an image model's first layer: nothing to check
    return None


_IMAGE_FLAGS = (("--image-size", "image_size"), ("--channels", "channels"), ("--mean", "mean"), ("--std", "std"),
                ("--resize", "resize"))


def _image_folder(args: argparse.Namespace, folder: str, expects: _Input):
    """The lazy ``ImageFolder`` of ``folder`` with the command's settings, checked against the model.

    Images are never converted to another channel count unless ``--channels`` asks for it: a
    folder whose images do not have the channels the model takes is an error saying what to pass.
    """
    from .data.fashion_mnist import MEAN, STD
    from .data.folder import ImageFolder, _CHANNEL_NAMES

    size = args.image_size or (expects.size if expects.size else None)
    probe = ImageFolder(folder, image_size=size, channels=args.channels, resize=args.resize or "stretch")
    own = probe.native_channels(0)  # one header read, to compare with the model before any work
    channels = args.channels or own
    if expects.channels is not None and channels != expects.channels:
        if args.channels is None:
            raise LowbitError(f"the images in {folder} are {_CHANNEL_NAMES[own]} ({own} channel(s), e.g. "
                              f"{probe.files[0].name}) but {expects.what} takes {expects.channels} channel(s): pass "
                              f"--channels {expects.channels} to convert them, or a model for {own}-channel images")
        raise LowbitError(f"--channels {args.channels}, but {expects.what} takes {expects.channels} channel(s)")
    mean, std = args.mean, args.std
    if (mean is None) != (std is None):
        raise LowbitError("--mean and --std go together (or neither)")
    if mean is None and expects.zoo and channels == 1:
        mean, std = (MEAN,), (STD,)  # the zoo models' Fashion-MNIST statistics
    if mean is not None and len(mean) != channels:
        raise LowbitError(f"--mean / --std need one value per channel: {channels} channel(s) "
                          f"({_CHANNEL_NAMES[channels]}), got {len(mean)} and {len(std)}")
    return ImageFolder(folder, image_size=size, channels=args.channels, mean=mean, std=std,
                       resize=args.resize or "stretch")


def _check_data(args: argparse.Namespace, splits: tuple[str, ...]) -> None:
    """Check that the images the command will read are there, before loading models or data.

    ``splits``: "train" (calibration / training images) and / or "test" (evaluation images).
    ``--calib-dir`` / ``--eval-dir`` replace Fashion-MNIST's train / test split; the image flags
    (``--image-size``, ``--channels``, ``--mean``, ``--std``, ``--resize``) apply to those folders.
    """
    from .data.fashion_mnist import find_root

    folder_of = {"train": getattr(args, "calib_dir", None), "test": getattr(args, "eval_dir", None)}
    fmnist = [s for s in splits if not folder_of[s]]
    for split in fmnist:
        find_root(args.data, split)
    if args.data and not fmnist:
        raise LowbitError("--data is not used: --calib-dir / --eval-dir give all the images this command reads")
    given = [flag for flag, name in _IMAGE_FLAGS if getattr(args, name, None) is not None]
    if given and len(fmnist) == len(splits):
        raise LowbitError(f"{', '.join(given)} apply to image folders (--calib-dir / --eval-dir); Fashion-MNIST "
                          f"is read as it is (1 x 28 x 28, its own statistics)")


def _check_fmnist_fits(args: argparse.Namespace, splits: tuple[str, ...], expects: _Input) -> None:
    """A model for other than 1-channel images cannot read Fashion-MNIST: say so (and what to pass)."""
    folder_of = {"train": ("--calib-dir", getattr(args, "calib_dir", None)),
                 "test": ("--eval-dir", getattr(args, "eval_dir", None))}
    for split in splits:
        flag, folder = folder_of[split]
        if not folder and expects.channels not in (None, 1):
            raise LowbitError(f"{expects.what} takes {expects.channels}-channel images, but Fashion-MNIST ({split} "
                              f"split) is grayscale: pass {flag} with your images")


def _data(args: argparse.Namespace, split: str, expects: _Input, limit: int | None = None):
    """``(images, labels)`` of ``split``: Fashion-MNIST, or the first ``limit`` images of the folder."""
    from .data import load_fashion_mnist

    folder = args.calib_dir if split == "train" else args.eval_dir
    if folder:
        images = _image_folder(args, folder, expects)
        if not images.classes:
            raise LowbitError(f"{folder} has no class sub-folders: {'evaluation' if split == 'test' else 'training'} "
                              f"needs labels (one sub-folder per class, sorted names -> 0..K-1)")
        return images.tensors(limit)
    _check_fmnist_fits(args, (split,), expects)
    x, y = load_fashion_mnist(split, args.data)
    return (x[:limit], y[:limit]) if limit else (x, y)


def _calibration(args: argparse.Namespace, expects: _Input):
    """Calibration images: Fashion-MNIST's train split sampled by ``--seed`` (as always), or the lazy
    folder of ``--calib-dir`` (the library reads only ``--calib-size`` of its images, drawn by the seed)."""
    from .data import load_fashion_mnist, sample_calibration

    if args.calib_dir:
        return _image_folder(args, args.calib_dir, expects)
    _check_fmnist_fits(args, ("train",), expects)
    x_train, _ = load_fashion_mnist("train", args.data)
    return sample_calibration(x_train, min(args.calib_size, len(x_train)), args.seed)


def _check_eval_flags(args: argparse.Namespace, evaluate: bool, how: str) -> None:
    """Evaluation flags without an evaluation would be ignored silently: refuse them."""
    if not evaluate:
        given = [flag for flag, value in (("--eval-size", args.eval_size), ("--eval-dir", args.eval_dir))
                 if value is not None]
        if given:
            raise LowbitError(f"{' and '.join(given)} apply only when evaluating ({how})")


def _method_options(args: argparse.Namespace, flags: dict[str, str | None]) -> dict[str, Any]:
    """``--option`` pairs plus ``--granularity`` / ``--groups``.

    ``flags`` maps the keyword arguments the command passes itself to their flag (None: not
    settable from the command line); an ``--option`` for one of those is refused rather than
    letting one of the two win silently (or crash with a duplicate keyword argument).
    """
    options: dict[str, Any] = {}
    for key, value in args.option or []:
        if key in options:
            raise LowbitError(f"--option {key} is given twice")
        if key in flags:
            flag = flags[key]
            raise LowbitError(f"--option {key}=...: " + (f"use {flag} instead" if flag
                                                         else "set by the command itself, not an option here"))
        options[key] = value
    for key, flag, value in (("granularity", "--granularity", args.granularity), ("groups", "--groups", args.groups)):
        if value is not None:
            if key in options:
                raise LowbitError(f"--option {key}=... and {flag} both given: use {flag}")
            options[key] = value
    if args.groups is not None:
        granularity = options.setdefault("granularity", "group")
        if granularity != "group":
            raise LowbitError(f"--groups needs --granularity group (or none), not {granularity!r}")
    return options


def _layer_bits(args: argparse.Namespace) -> dict[str, Any]:
    """``{"layer_bits": map}`` from ``--layer-bits-file`` then ``--layer-bits`` (later entries win), or ``{}``.

    The file is a JSON object ``{pattern: bits | null | [w_bits, a_bits or null] | [w0, w1, ...] |
    [[w0, w1, ...], a_bits or null]}`` (a list of other than two widths: per-channel weight widths, 0
    pruning a channel); a flag is ``PATTERN=BITS``, ``PATTERN=fp``, ``PATTERN=W,A`` (A an int or fp)
    or ``PATTERN=[W0,W1,...]`` (optionally ``,A``).
    """
    from .layer_bits import check_layer_bits, parse_cli_entry

    entries: dict[str, Any] = {}
    if args.layer_bits_file:
        try:
            data = json.loads(Path(args.layer_bits_file).read_text())
        except ValueError as exc:
            raise LowbitError(f"--layer-bits-file {args.layer_bits_file}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise LowbitError(f"--layer-bits-file {args.layer_bits_file}: expected a JSON object "
                              f"{{pattern: bits, null or [w_bits, a_bits]}}, got {type(data).__name__}")
        try:
            entries.update(check_layer_bits(data, "--layer-bits-file") or {})
        except LowbitError as exc:
            raise LowbitError(f"{args.layer_bits_file}: {exc}") from None
    for text in args.layer_bits or []:
        pattern, value = parse_cli_entry(text)
        entries.pop(pattern, None)  # a repeated pattern moves to the end: the later one wins
        entries[pattern] = value
    return {"layer_bits": entries} if entries else {}


# ------------------------------------------------------------------ commands

def cmd_methods(args: argparse.Namespace) -> int:
    from .ptq.registry import method_table
    from .qat.registry import get_qat_method, qat_methods

    table = [{**m, "kind": "ptq"} for m in method_table()]
    table += [{"name": n, "description": get_qat_method(n).description, "kind": "qat"} for n in qat_methods()]
    _emit(args, {"methods": table},
          [f"{m['name']:<12} {m['kind'].upper():<4} {m['description']}" for m in table])
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models
    from .models.zoo import available, pretrained_info

    rows = []
    for name in list_models():
        acc = pretrained_info(name).get("test_accuracy") if name in available() else None
        rows.append({"name": name, "pretrained_fmnist_top1": acc})
    _emit(args, {"models": rows},
          [f"{r['name']:<14} {'trained: %.2f%%' % r['pretrained_fmnist_top1'] if r['pretrained_fmnist_top1'] else 'no checkpoint'}"
           for r in rows])
    return 0


def _train_destination(args: argparse.Namespace) -> Path | None:
    """Where ``lowbit train`` writes: ``--out``, the shipped checkpoint with ``--update-zoo``, else the user cache."""
    from .models.zoo import checkpoint_destination, pretrained_path

    if args.no_save:
        return None
    if args.update_zoo:
        return check_writable(pretrained_path(args.model))
    dest = checkpoint_destination(args.model, args.out)
    return check_writable(dest, create_parent=args.out is None)


def cmd_train(args: argparse.Namespace) -> int:
    from .models.zoo import available, build_model, pretrained_info
    from .train import TrainConfig, train_zoo_model

    if not args.teacher and (args.kd is not None or args.kd_temperature is not None):
        raise LowbitError("--kd / --kd-temperature need --teacher MODEL")
    if args.stop_after is not None and not args.checkpoint:
        raise LowbitError("--stop-after needs --checkpoint PATH to continue from")
    missing = [t for t in args.teacher or () if t not in available()]
    if missing:
        raise LowbitError(f"--teacher {' '.join(missing)}: no shipped checkpoint; available: {', '.join(available())}")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      seed=args.seed, device=args.device,
                      kd_weight=(1.0 if args.kd is None else args.kd) if args.teacher else 0.0,
                      kd_temperature=1.0 if args.kd_temperature is None else args.kd_temperature,
                      swa_epochs=args.swa_epochs, swa_lr=args.swa_lr)
    kwargs = args.model_kwargs or {}
    if args.resume:
        recorded = pretrained_info(args.model).get("kwargs", {})
        if args.model_kwargs is not None and args.model_kwargs != recorded:
            raise LowbitError(f"--resume: the shipped {args.model} checkpoint was built with {json.dumps(recorded)}, "
                              f"not {json.dumps(args.model_kwargs)}")
    else:
        build_model(args.model, kwargs)  # a bad name or argument fails now, not after loading the data
    dest = _train_destination(args)
    _check_data(args, ("train", "test"))
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    _, result = train_zoo_model(args.model, cfg, args.data, save=dest is not None, progress=_progress(args),
                                log=log, resume=args.resume, teachers=tuple(args.teacher or ()),
                                checkpoint=args.checkpoint, stop_after=args.stop_after, out=dest, **kwargs)
    if not result.finished:
        _emit(args, {"model": args.model, "finished": False, "history": result.history},
              [f"{args.model}: stopped after epoch {len(result.history)}/{cfg.epochs}; "
               f"the same command continues from {args.checkpoint}"])
        return 0
    out: dict[str, Any] = {"model": args.model, "test_accuracy": result.test_accuracy, "history": result.history,
                           "checkpoint": str(dest) if dest else None}
    lines = [f"{args.model}: test accuracy {result.test_accuracy:.2f}%"]
    if dest is not None:
        lines.append(f"  wrote {dest} (and {dest.with_suffix('.json').name}); use it with --weights {dest}"
                     + ("" if args.update_zoo else f" or lowbit.load_pretrained({args.model!r}, weights=...)"))
    else:
        lines.append("  not saved (--no-save)")
    _emit(args, out, lines)
    return 0


_QUANTIZE_FLAGS: dict[str, str | None] = {
    "w_bits": "--w-bits", "a_bits": "--a-bits", "method": "--method", "calib_size": "--calib-size",
    "seed": "--seed", "device": "--device", "quantize_all": "--quantize-all", "equalize": "--equalize",
    "fold_bn": "--no-fold", "progress": "--progress / --no-progress", "config": None, "model": None, "calib": None,
    "layer_bits": "--layer-bits or --layer-bits-file",
}
_QAT_FLAGS: dict[str, str | None] = {
    **_QUANTIZE_FLAGS, "epochs": "--epochs", "resume": "--resume", "lr": "--lr", "scale_lr": "--scale-lr",
    "optimizer": "--optimizer", "batch_size": "--batch-size", "checkpoint": "--checkpoint", "log_dir": "--log-dir",
    "max_steps": "--max-steps", "kd_weight": "--kd", "kd_temperature": "--kd-temperature", "log": None,
    "train_data": None, "val_data": None,
}


def _quantize_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Every keyword argument of ``lowbit.quantize`` but the model and data, checked up front.

    The method, bits, QuantConfig fields and method options are validated by the API's own
    functions here, before any model or data is loaded.
    """
    from .config import build_config
    from .ptq.registry import get_method

    kwargs = dict(calib_size=args.calib_size, seed=args.seed, device=args.device, quantize_all=args.quantize_all,
                  equalize=args.equalize, fold_bn=not args.no_fold, progress=_progress(args),
                  **_method_options(args, _QUANTIZE_FLAGS), **_layer_bits(args))
    spec = get_method(args.method)
    _, method_options = build_config(args.w_bits, args.a_bits, {k: v for k, v in kwargs.items() if k != "layer_bits"})
    spec.make_options(method_options)
    return kwargs


def _quantize_from_args(args: argparse.Namespace, evaluate: bool):
    import torch

    import lowbit

    from .layer_bits import check_patterns

    kwargs = _quantize_kwargs(args)
    source = _model_source(args)
    _check_data(args, ("train", "test") if evaluate else ("train",))
    fp = _load_fp_model(args)
    check_patterns(fp, kwargs.get("layer_bits"))  # before any image is read
    args.expects = _Input.of_model(fp, source.is_zoo, f"--model {args.model}")
    if evaluate:
        _check_fmnist_fits(args, ("test",), args.expects)
    calib = _calibration(args, args.expects)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    qmodel = lowbit.quantize(fp, calib, w_bits=args.w_bits, a_bits=args.a_bits, method=args.method, **kwargs)
    return fp, qmodel, time.perf_counter() - start


def _report(args: argparse.Namespace, fp, qmodel, seconds: float, evaluate: bool) -> int:
    from .evaluate import timed_accuracy
    from .deploy.size import size_report

    import lowbit

    result: dict[str, Any] = {"model": args.model, "method": args.method, "w_bits": args.w_bits,
                              "a_bits": args.a_bits, "calib_size": args.calib_size,
                              "quantize_seconds": round(seconds, 2), **size_report(fp, qmodel)}
    a_txt = "fp" if args.a_bits is None else args.a_bits
    lines = [f"{args.model} W{args.w_bits}A{a_txt} method={args.method}  quantized in {seconds:.1f}s"]
    if evaluate:
        x, y = _data(args, "test", args.expects, args.eval_size)
        fp_acc, fp_t = timed_accuracy(fp.to(args.device), x, y, device=args.device)
        q_acc, q_t = timed_accuracy(qmodel, x, y, device=args.device)
        result.update(fp_top1=round(fp_acc, 2), quant_top1=round(q_acc, 2), drop=round(fp_acc - q_acc, 2),
                      eval_images=len(x), fp_eval_seconds=round(fp_t, 2), quant_eval_seconds=round(q_t, 2))
        lines += [f"  top-1 on {len(x)} test images: FP {fp_acc:.2f}%  quantized {q_acc:.2f}%  (drop {fp_acc - q_acc:.2f} points)",
                  f"  eval time: FP {fp_t:.2f}s  simulated-quantized {q_t:.2f}s"]
    lines.append(f"  size: FP32 {result['fp32_mb']:.3f} MB -> quantized {result['quantized_mb']:.3f} MB "
                 f"({result['compression']:.1f}x)")
    totals = lowbit.summary(qmodel).totals  # the true widths once --layer-bits or the protocol mixed them
    result.update(avg_w_bits=totals["avg_w_bits"], avg_a_bits=totals["avg_a_bits"], fp_layers=totals["fp_layers"])
    lines.append(f"  avg weight bits {totals['avg_w_bits']:.3f} (parameter-weighted, float layers at 32), "
                 f"{totals['fp_layers']} float layer(s); `lowbit inspect` shows every layer")
    if args.out:
        path = lowbit.export(qmodel, args.out)
        result.update(artifact=str(path), artifact_mb=path.stat().st_size / 2 ** 20)
        lines.append(f"  wrote {path} ({result['artifact_mb']:.3f} MB)")
    _emit(args, result, lines)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    _check_eval_flags(args, not args.no_eval, "not with --no-eval")
    fp, qmodel, seconds = _quantize_from_args(args, evaluate=not args.no_eval)
    return _report(args, fp, qmodel, seconds, evaluate=not args.no_eval)


def _architecture(args: argparse.Namespace):
    """The FP architecture ``--model`` names, for rebuilding an artifact (None without ``--model``).

    Only the architecture is needed (the artifact holds every weight), so no checkpoint is read
    and ``--weights`` is refused rather than ignored.
    """
    from .models.user import build_user_model

    if args.weights:
        raise LowbitError("--weights is not used with an artifact (it holds all the weights): "
                          "--model (and --model-kwargs) give only the architecture")
    if not args.model:
        if args.model_kwargs is not None:
            raise LowbitError("--model-kwargs needs --model")
        return None
    return build_user_model(_model_source(args), args.model_kwargs)


def _load_artifact(args: argparse.Namespace, path: str):
    """``lowbit.load(path, model=<--model's architecture>)``; an artifact naming no zoo model needs ``--model``."""
    import lowbit

    model = _architecture(args)
    try:
        return lowbit.load(path, model=model, device=args.device)
    except LowbitError as exc:
        if model is None and "does not name a zoo architecture" in str(exc):
            raise LowbitError(f"{path} names no zoo architecture: pass the model it was made from, --model "
                              f"file.py:factory (or package.module:factory, and --model-kwargs)") from None
        raise


# quantization flags that have no meaning when export converts an existing artifact
_CONVERT_IGNORES = ("w_bits", "a_bits", "method", "granularity", "groups", "calib_size", "calib_dir", "seed",
                    "quantize_all", "equalize", "no_fold", "layer_bits", "layer_bits_file", "option", "data")


def _export_artifact(args: argparse.Namespace, out: str) -> int:
    """``lowbit export m.lowbit --onnx m.onnx``: rebuild an artifact and write it in another format."""
    import lowbit
    from .evaluate import timed_accuracy

    given = [f"--{name.replace('_', '-')}" for name in _CONVERT_IGNORES
             if getattr(args, name) != args.parser.get_default(name) and not (name == "data" and args.eval)]
    if given:
        raise LowbitError(f"{', '.join(given)}: for quantizing a model, not for exporting an artifact "
                          f"({args.artifact} is already quantized)")
    if args.artifact.lower().endswith(".onnx"):
        raise LowbitError(f"{args.artifact} is an ONNX file: export reads a .lowbit artifact")
    qmodel = _load_artifact(args, args.artifact)
    expects = _Input.of_model(qmodel, bool((qmodel.lowbit_info or {}).get("arch")), args.artifact)
    if args.eval:
        _check_data(args, ("test",))
    path = lowbit.export(qmodel, out)
    result: dict[str, Any] = {"artifact": args.artifact, "out": str(path), "out_mb": path.stat().st_size / 2 ** 20}
    lines = [f"{args.artifact} -> {path} ({result['out_mb']:.3f} MB)"]
    if args.eval:
        x, y = _data(args, "test", expects, args.eval_size)
        acc, seconds = timed_accuracy(qmodel, x, y, device=args.device)
        result.update(quant_top1=round(acc, 2), eval_images=len(x))
        lines.append(f"  top-1 on {len(x)} test images: {acc:.2f}% ({seconds:.2f}s)")
    _emit(args, result, lines)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _check_eval_flags(args, args.eval, "with --eval")
    if args.out and args.onnx:
        raise LowbitError("--out and --onnx both given: --onnx FILE is --out FILE.onnx")
    out = args.out or args.onnx
    if not out:
        raise LowbitError("the following arguments are required: --out FILE (.lowbit, .onnx) or --onnx FILE")
    if args.artifact:
        return _export_artifact(args, out)
    if not args.model:
        raise LowbitError("export needs --model (to quantize a model) or an artifact path (to convert it)")
    args.out = out
    fp, qmodel, seconds = _quantize_from_args(args, evaluate=args.eval)
    return _report(args, fp, qmodel, seconds, evaluate=args.eval)


def _onnx_input(session, path: str) -> _Input:
    """What an ONNX model takes: channels and size from its input's fixed dimensions."""
    shape = list(session.get_inputs()[0].shape)
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    channels = dims[1] if len(dims) == 4 else None
    size = (dims[2], dims[3]) if len(dims) == 4 and dims[2] and dims[3] else None
    return _Input(True, channels, size, path)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import timed_accuracy

    artifact_onnx = bool(args.artifact) and args.artifact.lower().endswith(".onnx")
    sources = [what for what, given in (("an artifact path", args.artifact), ("--onnx", args.onnx)) if given]
    if len(sources) > 1 or (args.model and (args.onnx or artifact_onnx)):
        raise LowbitError(f"eval takes one model to evaluate, got {' and '.join(sources + ['--model'] * bool(args.model))}")
    if not sources and not args.model:
        raise LowbitError("eval needs an artifact path (with --model for one made from your own model), "
                          "--onnx FILE or --model (the FP model)")
    if not args.model and (args.weights or args.model_kwargs is not None):
        raise LowbitError("--weights / --model-kwargs go with --model")
    onnx_path = args.onnx or (args.artifact if artifact_onnx else None)
    if onnx_path and args.device != "cpu":
        raise LowbitError("ONNX models are evaluated on the CPU (ONNX Runtime): --device does not apply")
    # the model first (a missing or unreadable file is the likelier mistake), then the data
    if onnx_path:
        from .deploy.onnx_qdq import onnx_accuracy, onnx_session

        session = onnx_session(onnx_path)
        _check_data(args, ("test",))
        x, y = _data(args, "test", _onnx_input(session, onnx_path), args.eval_size)
        acc, seconds = onnx_accuracy(session, x, y)
        _emit(args, {"model": onnx_path, "runtime": "onnxruntime", "top1": round(acc, 2), "images": len(x),
                     "seconds": round(seconds, 2)},
              [f"{onnx_path} (ONNX Runtime, CPU): top-1 {acc:.2f}% on {len(x)} images ({seconds:.2f}s)"])
        return 0
    if args.artifact:
        if not Path(args.artifact).is_file():
            raise LowbitError(f"no artifact at {args.artifact}" + (" (it is a directory)"
                                                                   if Path(args.artifact).is_dir() else ""))
        model = _load_artifact(args, args.artifact)
        what = args.artifact
        expects = _Input.of_model(model, bool((model.lowbit_info or {}).get("arch")), args.artifact)
    else:
        source = _model_source(args)
        model, what = _load_fp_model(args), f"{args.model} (FP)"
        expects = _Input.of_model(model, source.is_zoo, f"--model {args.model}")
    _check_data(args, ("test",))
    x, y = _data(args, "test", expects, args.eval_size)
    acc, seconds = timed_accuracy(model, x, y, device=args.device)
    _emit(args, {"model": what, "top1": round(acc, 2), "images": len(x), "seconds": round(seconds, 2)},
          [f"{what}: top-1 {acc:.2f}% on {len(x)} images ({seconds:.2f}s)"])
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """The per-layer table and totals of an artifact (``lowbit.summary`` of the loaded model)."""
    import lowbit

    from .deploy.artifact import read_artifact

    from .models.user import build_user_model

    model = None
    if args.model:
        model = build_user_model(_model_source(args), args.model_kwargs)
    elif args.model_kwargs:
        raise LowbitError("--model-kwargs needs --model")
    elif not read_artifact(args.artifact)[0].get("arch"):
        # --model NAME: a zoo name, file.py:factory or package.module:factory (see --help)
        raise LowbitError(f"{args.artifact} names no zoo architecture: pass --model NAME (and --model-kwargs)")
    report = lowbit.summary(lowbit.load(args.artifact, model=model))
    if args.json:
        print(json.dumps({"artifact": args.artifact, **report.to_dict()}, indent=2))
    else:
        print(f"{args.artifact}\n\n{report.to_markdown()}")
    return 0


def _qat_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Every keyword argument of ``lowbit.qat`` but the model, data and log, checked up front."""
    from .config import build_config
    from .qat.engine import QAT_FIELDS, QatConfig
    from .qat.registry import get_qat_method

    if args.max_steps is not None and not args.checkpoint:
        raise LowbitError("--max-steps needs --checkpoint PATH: the run stops early and continues from it")
    if args.resume and not args.checkpoint:
        raise LowbitError("--resume needs --checkpoint PATH")
    train = {k: v for k, v in (("lr", args.lr), ("scale_lr", args.scale_lr), ("optimizer", args.optimizer),
                               ("batch_size", args.batch_size), ("checkpoint", args.checkpoint),
                               ("log_dir", args.log_dir), ("max_steps", args.max_steps),
                               ("kd_weight", args.kd), ("kd_temperature", args.kd_temperature)) if v is not None}
    kwargs = dict(epochs=args.epochs, resume=args.resume, seed=args.seed, device=args.device,
                  quantize_all=args.quantize_all, progress=_progress(args), calib_size=args.calib_size,
                  equalize=args.equalize, **({"fold_bn": False} if args.no_fold else {}), **train,
                  **_method_options(args, _QAT_FLAGS), **_layer_bits(args))
    spec = get_qat_method(args.method)
    rest = dict(kwargs)
    rest.pop("layer_bits", None)  # checked by _layer_bits
    QatConfig(**{k: rest.pop(k) for k in list(rest) if k in QAT_FIELDS})
    _, method_options = build_config(args.w_bits, args.a_bits, rest)
    spec.make_options(method_options)
    return kwargs


def cmd_qat(args: argparse.Namespace) -> int:
    import lowbit
    from .evaluate import accuracy

    from .layer_bits import check_patterns

    kwargs = _qat_kwargs(args)
    source = _model_source(args)
    _check_data(args, ("train", "test"))
    fp = _load_fp_model(args)
    check_patterns(fp, kwargs.get("layer_bits"))  # before any image is read
    expects = _Input.of_model(fp, source.is_zoo, f"--model {args.model}")
    _check_fmnist_fits(args, ("train", "test"), expects)
    x_train, y_train = _data(args, "train", expects, args.train_size)
    x_test, y_test = _data(args, "test", expects, args.eval_size)
    main_process = os.environ.get("RANK", "0") == "0"
    log = (lambda s: print(s, file=sys.stderr)) if args.json or not main_process else print
    start = time.perf_counter()
    qmodel = lowbit.qat(fp, (x_train, y_train), (x_test, y_test), method=args.method, w_bits=args.w_bits,
                        a_bits=args.a_bits, log=log, **kwargs)
    seconds = time.perf_counter() - start
    if not main_process:
        return 0
    summary = lowbit.record_of(qmodel).qat
    result: dict[str, Any] = {"model": args.model, "method": args.method, "w_bits": args.w_bits,
                              "a_bits": args.a_bits, "seconds": round(seconds, 1), "finished": summary["finished"],
                              "steps": summary["steps"], "history": summary["history"]}
    lines = [f"{args.model} W{args.w_bits}A{args.a_bits or 'fp'} QAT method={args.method}: "
             f"{summary['steps']}/{summary['total_steps']} steps in {seconds:.0f}s"]
    if not summary["finished"]:
        lines.append(f"  stopped early (--max-steps); continue with --resume --checkpoint {args.checkpoint}")
        _emit(args, result, lines)
        return 0
    fp_acc = accuracy(fp.to(args.device), x_test, y_test, device=args.device)
    q_acc = accuracy(qmodel, x_test, y_test, device=args.device)
    result.update(fp_top1=round(fp_acc, 2), quant_top1=round(q_acc, 2), drop=round(fp_acc - q_acc, 2),
                  eval_images=len(x_test))
    lines.append(f"  top-1 on {len(x_test)} test images: FP {fp_acc:.2f}%  quantized {q_acc:.2f}%  "
                 f"(drop {fp_acc - q_acc:.2f} points)")
    if args.out:
        path = lowbit.export(qmodel, args.out)
        result["artifact"] = str(path)
        lines.append(f"  wrote {path}")
    _emit(args, result, lines)
    return 0


# ------------------------------------------------------------------ sensitivity

def _sensitivity_out(text: str) -> str:
    """The output folder of ``lowbit sensitivity``: created, and writable (checked before any work)."""
    try:
        path = Path(text)
        if path.exists() and not path.is_dir():
            raise LowbitError(f"--out {text}: not a directory")
        check_writable(path / "report.json", create_parent=True)
    except LowbitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Per-layer sensitivity report (report.md, report.json, heatmap.png) and optionally a bit map."""
    import torch

    import lowbit
    from .data import read_calibration
    from .sensitivity import _check_widths

    widths = _check_widths(args.bits)
    if args.allocate is not None and args.target != "weights":
        raise LowbitError("--allocate needs --target weights (the budget is the average weight bits)")
    if args.allocate is not None and args.allocate < min(widths):
        raise LowbitError(f"--allocate {args.allocate}: the budget is too small: below the narrowest width of "
                          f"--bits ({min(widths)})")
    kwargs: dict[str, Any] = dict(calib_size=args.calib_size, seed=args.seed, device=args.device,
                                  fold_bn=not args.no_fold, batch_size=args.batch_size, w_range=args.w_range,
                                  progress=_progress(args))
    if args.granularity:
        kwargs["granularity"] = args.granularity
    from .config import build_config
    build_config(max(widths), 8, {k: v for k, v in kwargs.items() if k not in ("w_range", "progress")})
    source = _model_source(args)
    _check_data(args, ("train",))
    fp = _load_fp_model(args)
    calib = _calibration(args, _Input.of_model(fp, source.is_zoo, f"--model {args.model}"))
    if not isinstance(calib, torch.Tensor):  # a folder: read only the --calib-size images drawn by --seed
        calib = read_calibration(calib, args.calib_size, args.seed)
    report = lowbit.sensitivity(fp, calib, bits=widths, target=args.target, metric=args.metric, **kwargs)
    out = Path(args.out)
    files = {"markdown": out / "report.md", "json": out / "report.json", "heatmap": out / "heatmap.png"}
    report.to_markdown(files["markdown"])
    report.to_json(files["json"])
    report.save_png(files["heatmap"])
    result: dict[str, Any] = {"seconds": report.seconds, "ranking": report.ranking(),
                              "files": {k: str(v) for k, v in files.items()}}
    lines = [report.to_markdown().rstrip(), "", f"wrote {', '.join(str(v) for v in files.values())}"]
    if args.allocate is not None:
        from .allocate import average_bits

        start = time.perf_counter()
        layer_bits = lowbit.allocate_bits(report=report, avg_w_bits=args.allocate, candidates=widths)
        result["allocation_seconds"] = time.perf_counter() - start
        files["layer_bits"] = out / "layer_bits.json"
        files["layer_bits"].write_text(json.dumps(layer_bits, indent=2) + "\n")
        result["layer_bits"] = layer_bits
        result["avg_w_bits"] = average_bits(layer_bits, report.params)
        result["files"]["layer_bits"] = str(files["layer_bits"])
        lines.append(f"layer_bits (average {result['avg_w_bits']:.3f} weight bits, budget {args.allocate}): "
                     f"{files['layer_bits']}")
    _emit(args, result, lines)
    return 0


# ------------------------------------------------------------------ parser

def _common(p: argparse.ArgumentParser, evaluation: bool = True) -> None:
    """Flags every data-reading command has (``evaluation``: also --eval-dir / --eval-size)."""
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text (errors too)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: on when stderr is a terminal)")
    p.add_argument("--device", default="cpu", type=device, help="cpu, cuda, cuda:N")
    p.add_argument("--data", type=existing_dir,
                   help="Fashion-MNIST folder (default: $LOWBIT_FASHION_MNIST or Debian's path)")
    if evaluation:
        p.add_argument("--eval-dir", type=existing_dir, help="evaluate on an image folder (class sub-folders) instead")
        p.add_argument("--eval-size", type=positive_int, help="evaluate on the first N test images only")


def _image_args(p: argparse.ArgumentParser) -> None:
    """How images of --calib-dir / --eval-dir are read (see ``lowbit.data.folder``)."""
    p.add_argument("--image-size", type=image_size, metavar="N|HxW",
                   help="resize folder images to N x N or H x W (default: 28 for zoo models, the artifact's or "
                        "ONNX input's size when it records one, else each image's own size, which must agree)")
    p.add_argument("--channels", type=channel_count, metavar="C",
                   help="convert folder images to C channels (1 gray, 3 RGB, 2/4 with alpha); default: their own, "
                        "which must match the model's first layer (nothing is converted silently)")
    p.add_argument("--mean", type=float_list, metavar="M[,M,...]",
                   help="per-channel mean to subtract from [0, 1] pixels, e.g. 0.485,0.456,0.406 (default: the "
                        "Fashion-MNIST statistics for gray images fed to zoo models or their artifacts, and to ONNX "
                        "files, which do not say what they were made from; else no normalization)")
    p.add_argument("--std", type=float_list, metavar="S[,S,...]", help="per-channel std to divide by (with --mean)")
    p.add_argument("--resize", choices=["stretch", "crop"],
                   help="stretch: resize to exactly --image-size (default); crop: scale to cover it, cut the centre")


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, metavar="MODEL",
                   help="a zoo name (see `lowbit models`), path/to/file.py:factory or package.module:factory "
                        "(a function or class returning your nn.Module)")
    p.add_argument("--weights", type=existing_file,
                   help="weights for --model: safetensors, or a torch.save state dict (read with "
                        "weights_only=True; a checkpoint dict with 'state_dict' or 'model' too). Default: the "
                        "shipped checkpoint of a zoo model, whatever the factory built for your own")
    p.add_argument("--model-kwargs", type=json_object, metavar="JSON",
                   help="keyword arguments for the factory or zoo constructor, e.g. '{\"width\": 4}' (default: "
                        "the checkpoint's record, FILE.json beside --weights FILE)")


# The CLI's PTQ default. Bit-Split has the best accuracy of the methods that run in about a minute on a
# CPU (benchmarks/RESULTS.md, 1024 calibration images: ResNet-20 W4A4 93.58% in 13 s vs minmax 91.17% in
# 1 s, MSE 93.16%, BRECQ 93.51% in 101 s, distill 93.43% in 240 s; W2A4 92.66% vs 36.42% for minmax;
# MobileNetV2 W4A4 93.14% in 52 s vs minmax 92.90%, W2A4 92.08% vs 84.85%). The Python API keeps
# method="minmax" as its default (a stable public signature).
RECOMMENDED_METHOD = "bitsplit"


def _quant_args(p: argparse.ArgumentParser, out_required: bool = False, model_required: bool = True) -> None:
    _model_args(p, required=model_required)
    p.add_argument("--w-bits", type=w_bits, default=4, help="weight bits, 1..16")
    p.add_argument("--a-bits", type=a_bits, default=4, help="activation bits 1..16, or 'fp' for weights only")
    p.add_argument("--method", default=RECOMMENDED_METHOD,
                   help=f"see `lowbit methods` (default: {RECOMMENDED_METHOD}, the best accuracy at about a minute "
                        f"of CPU time or less in benchmarks/RESULTS.md: ResNet-20 W4A4 93.58%% in 13 s vs minmax "
                        f"91.17%%, BRECQ 93.51%% in 101 s; use minmax for the fastest run)")
    p.add_argument("--granularity", choices=["tensor", "channel", "group"])
    p.add_argument("--groups", type=positive_int, help="G groups of output channels (implies --granularity group)")
    p.add_argument("--calib-size", type=positive_int, default=1024)
    p.add_argument("--calib-dir", type=existing_dir, help="calibrate on an image folder instead of Fashion-MNIST train")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--quantize-all", action="store_true",
                   help="no 8-bit first/last layers, quantize the network input too")
    p.add_argument("--equalize", action="store_true", help="cross-layer equalization first")
    p.add_argument("--no-fold", action="store_true", help="keep BatchNorm unfolded")
    p.add_argument("--layer-bits", action="append", metavar="PATTERN=BITS",
                   help="per-layer widths over glob patterns of layer names (repeatable, later wins): "
                        "'layers.0.*=8', 'fc=fp' (keep in float), 'conv1=4,8' (weights 4, input 8; 'W,fp': float input), "
                        "'conv1=[8,8,4,0]' (per-channel weight widths, 0 prunes the channel; ',A' sets the input)")
    p.add_argument("--layer-bits-file", type=existing_file, metavar="MAP.json",
                   help="JSON object {pattern: bits | null | [w_bits, a_bits] | [w0, w1, ...] (per-channel widths, 0 prunes "
                        "a channel) | [[w0, ...], a_bits]}, applied before --layer-bits")
    p.add_argument("--option", action="append", type=parse_option, metavar="NAME=VALUE",
                   help="method option or QuantConfig field without its own flag (repeatable), e.g. --option p_act=2.4")
    p.add_argument("--out", type=output_file, required=out_required,
                   help="write the artifact here: .lowbit, .safetensors or no suffix (packed artifact), or .onnx")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description="Low-bit quantization of PyTorch CNNs",
                     epilog=f"Errors end with 'lowbit: error: ...' and exit status 2 (1 for a bug in lowbit: "
                            f"{DEBUG_VAR}=1 shows its traceback).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list quantization methods")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("models", help="list zoo models and their trained checkpoints")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("train", help="train a zoo model on Fashion-MNIST (writes a checkpoint, see --out)")
    p.add_argument("model")
    p.add_argument("--model-kwargs", type=json_object, metavar="JSON", help="JSON constructor arguments")
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=0.1)
    p.add_argument("--weight-decay", type=nonnegative_float, default=5e-4)
    p.add_argument("--seed", type=seed_int, default=0)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="FILE.safetensors",
                       help="write the trained weights here, their record beside them as FILE.json (default: "
                            "$LOWBIT_HOME/checkpoints, else $XDG_CACHE_HOME/lowbit/checkpoints, else "
                            "~/.cache/lowbit/checkpoints: <model>_fmnist.safetensors)")
    where.add_argument("--update-zoo", action="store_true",
                       help="replace the checkpoint shipped in the package (for maintainers)")
    where.add_argument("--no-save", action="store_true", help="write no checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="start from the shipped checkpoint (fine-tune with a fresh schedule)")
    p.add_argument("--teacher", nargs="+", metavar="MODEL",
                   help="distil from these shipped zoo checkpoints (their averaged predictions)")
    p.add_argument("--kd", type=fraction, metavar="WEIGHT",
                   help="with --teacher: weight of the distillation loss (default 1: soft targets only)")
    p.add_argument("--kd-temperature", type=positive_float, help="with --teacher: softmax temperature (default 1)")
    p.add_argument("--swa-epochs", type=nonnegative_int, default=0, metavar="N",
                   help="average the weights of the last N epochs, run at the constant --swa-lr (SWA)")
    p.add_argument("--swa-lr", type=positive_float, default=0.01)
    p.add_argument("--checkpoint", metavar="PATH",
                   help="training state after every epoch; the same command continues from it when it exists")
    p.add_argument("--stop-after", type=positive_int, metavar="N",
                   help="with --checkpoint: stop after N epochs of this run")
    _common(p, evaluation=False)  # training evaluates on the whole Fashion-MNIST test split
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("quantize", help="quantize a model and report FP vs quantized accuracy, size, time")
    _quant_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation")
    _common(p)
    _image_args(p)
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("export", help="quantize a model and write its artifact (--out required), or convert an "
                                      "artifact (`lowbit export m.lowbit --onnx m.onnx`)")
    p.add_argument("artifact", nargs="?",
                   help="a .lowbit artifact to write in another format (then --model gives only the architecture, "
                        "needed when the artifact names no zoo model)")
    _quant_args(p, model_required=False)
    p.add_argument("--onnx", type=output_file, metavar="FILE.onnx", help="write an ONNX QDQ graph (--out FILE.onnx)")
    p.add_argument("--eval", action="store_true", help="also evaluate accuracy")
    _common(p)
    _image_args(p)
    p.set_defaults(func=cmd_export, parser=p)
    p = sub.add_parser("qat", help="quantization-aware fine-tuning (lsq, gdrq); torchrun for several processes")
    _quant_args(p)
    p.set_defaults(method="lsq")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--scale-lr", type=nonnegative_float, help="learning rate of step sizes (default: --lr)")
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--train-size", type=positive_int, help="first N training images only")
    p.add_argument("--checkpoint", help="checkpoint file (written periodically, atomically)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--max-steps", type=positive_int, help="stop after N steps in this run (resume later)")
    p.add_argument("--log-dir", help="per-epoch CSV/JSON log and training-curve PNG")
    p.add_argument("--kd", type=fraction, metavar="WEIGHT",
                   help="distil from the FP model: weight of KL to its logits (1: pure KD, default 0)")
    p.add_argument("--kd-temperature", type=positive_float)
    _common(p)
    _image_args(p)
    p.set_defaults(func=cmd_qat)
    p = sub.add_parser("inspect", help="per-layer bit widths, parameters and bytes of a .lowbit artifact")
    p.add_argument("artifact", type=existing_file, help="a .lowbit artifact")
    p.add_argument("--model", help="the architecture, for an artifact that names no zoo model: a zoo name, "
                                   "file.py:factory or package.module:factory")
    p.add_argument("--model-kwargs", type=json_object, metavar="JSON", help="keyword arguments for --model")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the markdown table")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("eval", help="accuracy of an artifact, an ONNX file or an FP model")
    p.add_argument("artifact", nargs="?", help="a .lowbit artifact (with --model when it was made from your own "
                                               "model: the architecture), or an .onnx file")
    p.add_argument("--onnx", metavar="FILE", help="evaluate an ONNX model in ONNX Runtime (CPU)")
    _model_args(p, required=False)
    _common(p)
    _image_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sensitivity", help="per-layer sensitivity to quantization (report.md, report.json, "
                                           "heatmap.png) and optionally a bit allocation")
    _model_args(p)
    p.add_argument("--bits", type=w_bits, nargs="+", default=[2, 3, 4, 8], help="widths to measure (1..16)")
    p.add_argument("--target", choices=["weights", "activations", "both"], default="weights")
    p.add_argument("--metric", choices=["kl", "taylor"], default="kl",
                   help="kl: KL to the FP outputs; taylor: LBA's first-order score")
    p.add_argument("--w-range", choices=["mse", "minmax"], default="mse", help="weight clipping range per layer")
    p.add_argument("--granularity", choices=["tensor", "channel"], help="weight scales (default: channel)")
    p.add_argument("--calib-size", type=positive_int, default=256)
    p.add_argument("--calib-dir", type=existing_dir, help="calibrate on an image folder instead of Fashion-MNIST train")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--no-fold", action="store_true", help="keep BatchNorm unfolded")
    p.add_argument("--allocate", type=positive_float, metavar="AVG_BITS",
                   help="also allocate widths from --bits at this average weight bits (first/last layer at 8): "
                        "writes layer_bits.json")
    p.add_argument("--out", type=_sensitivity_out, required=True, metavar="DIR", help="output folder")
    _common(p, evaluation=False)
    _image_args(p)
    p.set_defaults(func=cmd_sensitivity)
    return parser


# ------------------------------------------------------------------ entry point

def _one_line(text: str) -> str:
    """A message as one line (some exceptions carry several)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def _os_message(exc: OSError) -> str:
    """``FILE: reason`` for an OSError (errno text and the file names it carries)."""
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    if exc.strerror and names:
        return f"{' -> '.join(names)}: {exc.strerror}"
    return str(exc.strerror or exc)


def _report_error(message: str, kind: str, code: int, json_mode: bool, prefix: str = "error") -> int:
    """Print the one error line (and the JSON error object) and return the exit status."""
    message = _one_line(message)
    if os.environ.get(DEBUG_VAR) and sys.exc_info()[0] is not None:
        traceback.print_exc(file=sys.stderr)
    print(f"lowbit: {prefix}: {message}", file=sys.stderr)
    if json_mode:
        print(json.dumps({"error": message, "type": kind, "exit_code": code}))
    return code


def _wants_json(argv: list[str]) -> bool:
    """Whether ``--json`` was given (read from argv, since a usage error leaves no parsed arguments)."""
    return "--json" in (argv[: argv.index("--")] if "--" in argv else argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2: the user's error, 1: a bug, 130: Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    json_mode = _wants_json(argv)
    try:
        args = build_parser().parse_args(argv)
        json_mode = bool(getattr(args, "json", json_mode))
        return args.func(args)
    except UsageError as exc:  # one line, like every other error; it points to --help for the usage
        return _report_error(f"{exc} (see '{exc.parser.prog} --help')", "UsageError", EXIT_USER_ERROR, json_mode)
    except LowbitError as exc:
        return _report_error(str(exc), "LowbitError", EXIT_USER_ERROR, json_mode)
    except BrokenPipeError:
        # the reader of our output went away (e.g. `lowbit methods | head -1`): nothing to say, nowhere to say it
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_INTERNAL_ERROR
    except OSError as exc:
        return _report_error(_os_message(exc), type(exc).__name__, EXIT_USER_ERROR, json_mode)
    except KeyboardInterrupt:
        return _interrupted(json_mode)
    except SystemExit as exc:  # --help exits through argparse with status 0: return it like every outcome
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USER_ERROR)
    except Exception as exc:  # noqa: BLE001 -- everything else is a bug in lowbit: say so, keep it apart
        hint = "" if os.environ.get(DEBUG_VAR) else f"; rerun with {DEBUG_VAR}=1 for the traceback"
        return _report_error(f"{type(exc).__name__}: {exc} (a bug in lowbit, please report it{hint})",
                             "InternalError", EXIT_INTERNAL_ERROR, json_mode, prefix="internal error")


def _interrupted(json_mode: bool) -> int:
    """Ctrl-C: one line (and the JSON object), exit status 130; no traceback even with LOWBIT_DEBUG."""
    print("lowbit: interrupted", file=sys.stderr)
    if json_mode:
        print(json.dumps({"error": "interrupted", "type": "KeyboardInterrupt", "exit_code": EXIT_INTERRUPTED}))
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
