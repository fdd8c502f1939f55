"""Trained Fashion-MNIST checkpoints: the ones shipped in the package, and the user's own.

The package's checkpoints (``CHECKPOINT_DIR``) are read-only for everyday use: ``load_pretrained``
reads them, and training writes to the user's checkpoint folder (``user_checkpoint_dir``) or a
path the caller names. Only an explicit ``path=pretrained_path(name)`` (``lowbit train
--update-zoo``) replaces a shipped checkpoint.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import LowbitError
from ..files import atomic_write
from .registry import create_model, list_models

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
HOME_VAR = "LOWBIT_HOME"


def pretrained_path(name: str, dataset: str = "fmnist") -> Path:
    """Path of the checkpoint for model ``name`` shipped inside the package."""
    return CHECKPOINT_DIR / f"{name}_{dataset}.safetensors"


def user_checkpoint_dir() -> Path:
    """Where ``lowbit train`` stores checkpoints by default.

    ``$LOWBIT_HOME/checkpoints``, else ``$XDG_CACHE_HOME/lowbit/checkpoints``, else
    ``~/.cache/lowbit/checkpoints`` (not created here).
    """
    if os.environ.get(HOME_VAR):
        return Path(os.environ[HOME_VAR]).expanduser() / "checkpoints"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(cache).expanduser() / "lowbit" / "checkpoints"


def user_checkpoint_path(name: str, dataset: str = "fmnist") -> Path:
    """Default path of a checkpoint that ``lowbit train`` writes for ``name``."""
    return user_checkpoint_dir() / f"{name}_{dataset}.safetensors"


def checkpoint_destination(name: str, path: str | os.PathLike | None = None, dataset: str = "fmnist") -> Path:
    """Where a trained checkpoint of ``name`` goes: ``path``, else ``user_checkpoint_path(name)``.

    The path must end in ``.safetensors`` (the JSON record goes beside it); a LowbitError otherwise,
    so that a bad path is refused before training rather than after it.
    """
    path = user_checkpoint_path(name, dataset) if path is None else Path(path)
    if path.suffix != ".safetensors":
        raise LowbitError(f"checkpoint path must end in .safetensors (its record goes beside it as .json): {path}")
    return path


def pretrained_info(name: str, dataset: str = "fmnist") -> dict:
    """Metadata recorded at training time (test accuracy, epochs, constructor arguments)."""
    path = pretrained_path(name, dataset).with_suffix(".json")
    if not path.exists():
        raise LowbitError(f"no trained checkpoint for {name!r} on {dataset}; available: {available()}")
    return json.loads(path.read_text())


def checkpoint_record(weights: str | os.PathLike) -> dict | None:
    """The training record beside a checkpoint file (``x.safetensors`` -> ``x.json``), if it has one.

    A JSON file there that is not a lowbit record (not an object naming the model) is not ours
    and is ignored.
    """
    path = Path(weights).with_suffix(".json")
    if path == Path(weights) or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("name"), str) else None


def available(dataset: str = "fmnist") -> list[str]:
    """Names of the models with a checkpoint shipped in the package."""
    return sorted(p.name[: -len(f"_{dataset}.safetensors")] for p in CHECKPOINT_DIR.glob(f"*_{dataset}.safetensors"))


def build_model(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``create_model(name, **kwargs)`` with bad constructor arguments reported as a LowbitError.

    ``kwargs`` come from the caller (``--model-kwargs``, a checkpoint record): the zoo constructors
    work with their defaults, so a TypeError, ValueError or RuntimeError (torch, e.g. a negative
    width) raised with arguments given is about those arguments. Without arguments it is a bug
    and propagates as it is.
    """
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise LowbitError(f"model arguments must be a mapping of names to values, got {kwargs!r}")
    return create_model(name, **kwargs)  # bad arguments are a LowbitError there


def read_state_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a safetensors file (no pickle), or a LowbitError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"no weights file at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise LowbitError(f"{path} is not a readable safetensors file: {exc}") from None


def load_state(model: nn.Module, state: dict[str, Tensor], source: str) -> nn.Module:
    """Load ``state`` into ``model`` after checking names and shapes (a LowbitError naming ``source``)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        arch = getattr(model, "lowbit_arch", None) or {"name": type(model).__name__, "kwargs": {}}
        parts = [f"{what} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                 for what, items in (("missing", missing), ("unexpected", unexpected),
                                     ("shape file vs model", shapes)) if items]
        raise LowbitError(f"{source} does not fit {arch['name']} with arguments {json.dumps(arch['kwargs'])}: "
                          f"{'; '.join(parts)} (other --model-kwargs?)")
    tensors = OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # torch.save state dicts carry per-module versions some modules' loaders read
        tensors._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(tensors)
    return model


def load_pretrained(name: str, dataset: str = "fmnist", *, weights: str | os.PathLike | None = None,
                    model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build ``name`` and load trained weights (safetensors, no pickle). Returns an eval-mode model.

    Args:
        name: a zoo model name.
        dataset: the data set of the shipped checkpoint.
        weights: a checkpoint file of your own (e.g. written by ``lowbit train``) instead of the
            shipped one; the constructor arguments come from the record beside it (``x.json``) when
            there is one.
        model_kwargs: constructor arguments; must agree with the checkpoint's record when it has one.
    """
    if name not in list_models():
        raise LowbitError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if weights is None:
        info, path = pretrained_info(name, dataset), pretrained_path(name, dataset)
    else:
        path = Path(weights)
        info = checkpoint_record(path) or {}
        if info and info["name"] != name:
            raise LowbitError(f"{path} holds a {info['name']} checkpoint (see {path.with_suffix('.json')}), not {name}")
    recorded = info.get("kwargs")
    if model_kwargs is not None and recorded is not None and model_kwargs != recorded:
        raise LowbitError(f"{path} was trained with model arguments {json.dumps(recorded)}, "
                          f"not {json.dumps(model_kwargs)}")
    model = build_model(name, model_kwargs if model_kwargs is not None else (recorded or {}))
    return load_state(model, read_state_file(path), str(path)).eval()


def save_pretrained(model: nn.Module, name: str, info: dict, dataset: str = "fmnist",
                    path: str | os.PathLike | None = None) -> Path:
    """Write a checkpoint (fp32 safetensors) and its JSON record (same name, ``.json``).

    ``path`` defaults to ``user_checkpoint_path(name, dataset)``: the shipped checkpoint is
    replaced only when it is passed explicitly (``pretrained_path(name, dataset)``).
    """
    from safetensors.torch import save_file

    path = checkpoint_destination(name, path, dataset)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return path
