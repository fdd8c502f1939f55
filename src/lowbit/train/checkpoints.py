"""Training-state checkpoints: atomic writes, and refusing a file from another run or a damaged one.

Shared by FP training (``lowbit.train.fp``) and QAT (``lowbit.qat.engine``).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LowbitError
from ..files import atomic_write


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
