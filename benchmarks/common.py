"""Shared benchmark plumbing: machine description, timing, and section-wise RESULTS.md writing."""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Iterable

import torch

# reproduce.py points LOWBIT_RESULTS at a scratch file, then files the sections it collects under their
# seed table; a script run by hand writes straight into benchmarks/RESULTS.md.
RESULTS = Path(os.environ.get("LOWBIT_RESULTS") or Path(__file__).with_name("RESULTS.md"))
# Sampled when the script starts, before it loads the machine itself: a 1-minute load average near 0
# means no other work was running, so its timings are quiet-machine timings.
LOAD_AT_START = os.getloadavg()[0]
SETTINGS: dict[str, object] = {}
HEADER = ("# lowbit benchmark results\n\nEvery section below is written by the command it names "
          "(never by hand); rerun that command to refresh it.\n")


def add_method_option_arg(ap) -> None:
    """``--option METHOD NAME=VALUE`` (repeatable); read back with ``method_options``."""
    ap.add_argument("--option", nargs=2, action="append", metavar=("METHOD", "NAME=VALUE"), default=[],
                    help="method option, values read as in the CLI, e.g. --option distill block_iters=1000")


def method_options(pairs: list[list[str]]) -> dict[str, dict]:
    """{method: {name: value}} from ``--option`` pairs, parsed like the ``lowbit`` CLI's ``--option``."""
    from lowbit.cli import parse_option

    out: dict[str, dict] = {}
    for method, text in pairs:
        key, value = parse_option(text)
        out.setdefault(method, {})[key] = value
    return out


def add_data_args(ap) -> None:
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--eval-size", type=int, default=None, help="first N test images (default all 10k)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")


def load_data(args):
    """``(calib, x_test, y_test)``: deterministic calibration sample of the train split, test split."""
    from lowbit.data import load_fashion_mnist, sample_calibration

    x_train, _ = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if args.eval_size:
        x_test, y_test = x_test[:args.eval_size], y_test[:args.eval_size]
    return sample_calibration(x_train, args.calib_size, seed=0), x_test, y_test


def parse_args(ap) -> argparse.Namespace:
    """``ap.parse_args()``, remembered so that every section states all settings, defaults included."""
    args = ap.parse_args()
    SETTINGS.clear()
    SETTINGS.update({k: v for k, v in vars(args).items() if k not in ("no_write", "out")})
    return args


def settings() -> str:
    """``name=value`` for every argument of the script (empty when it did not use ``parse_args``)."""
    def show(v) -> str:
        if isinstance(v, (list, tuple)):
            return " ".join(map(str, v)) if v else "(none)"
        return str(v)
    return ", ".join(f"{k}={show(v)}" for k, v in SETTINGS.items())


def idle() -> str:
    """Whether the machine was otherwise idle: the load average when the script started, with the verdict."""
    busy = LOAD_AT_START >= 0.5
    return (f"1-min load average {LOAD_AT_START:.1f} at start "
            f"({'shared with other work: timings are not quiet-machine timings' if busy else 'otherwise idle'})")


def load_train_test(train_size: int | None, eval_size: int | None):
    """``(x_train, y_train, x_test, y_test)``: the first ``train_size`` training images (all when None) and
    the first ``eval_size`` test images (all when None), for the training benchmarks."""
    from lowbit.data import load_fashion_mnist

    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if train_size:
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    if eval_size:
        x_test, y_test = x_test[:eval_size], y_test[:eval_size]
    return x_train, y_train, x_test, y_test


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{gpu}, Python {platform.python_version()}")


def command() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path(__file__).resolve().parent.parent)
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])


def checkpoints(models: Iterable[str]) -> str:
    """``name sha256[:12]`` of each zoo checkpoint used, so a table can be matched to the weights it measured."""
    from lowbit.models.zoo import pretrained_path

    parts = []
    for name in dict.fromkeys(models):
        path = pretrained_path(name)
        if path.exists():
            parts.append(f"{name} `{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}`")
    return ", ".join(parts)


def write_section(name: str, body: str, models: Iterable[str] = ()) -> None:
    """Replace (or append) section ``name`` of RESULTS.md with ``body``, stamped with machine, command and
    the checkpoints of ``models``."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    weights = checkpoints(models)
    weights = f"; checkpoints: {weights}" if weights else ""
    given = settings()
    given = f"; settings: {given}" if given else ""
    block = (f"<!-- section:{name} -->\n{body.rstrip()}\n\n"
             f"_Command: `{command()}`{given}; machine: {machine()}, {idle()}{weights}; written {stamp}._\n"
             f"<!-- /section:{name} -->")
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def mean_spread(values: list[float]):
    """One value as itself; several as ``"mean +- std"`` (sample standard deviation), two decimals."""
    if len(values) == 1:
        return values[0]
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean().item():.2f} +- {t.std().item():.2f}"


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
