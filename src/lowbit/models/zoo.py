"""Trained Fashion-MNIST checkpoints shipped inside the package."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import LowbitError
from ..files import atomic_write
from .registry import create_model

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


def pretrained_path(name: str, dataset: str = "fmnist") -> Path:
    """Path of the shipped checkpoint for model ``name``."""
    return CHECKPOINT_DIR / f"{name}_{dataset}.safetensors"


def pretrained_info(name: str, dataset: str = "fmnist") -> dict:
    """Metadata recorded at training time (test accuracy, epochs, constructor arguments)."""
    path = pretrained_path(name, dataset).with_suffix(".json")
    if not path.exists():
        raise LowbitError(f"no trained checkpoint for {name!r} on {dataset}; available: {available()}")
    return json.loads(path.read_text())


def available(dataset: str = "fmnist") -> list[str]:
    return sorted(p.name[: -len(f"_{dataset}.safetensors")] for p in CHECKPOINT_DIR.glob(f"*_{dataset}.safetensors"))


def load_pretrained(name: str, dataset: str = "fmnist") -> nn.Module:
    """Build ``name`` and load its trained weights (safetensors, no pickle). Returns eval-mode model."""
    from safetensors.torch import load_file

    info = pretrained_info(name, dataset)
    model = create_model(name, **info.get("kwargs", {}))
    state = load_file(str(pretrained_path(name, dataset)))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def save_pretrained(model: nn.Module, name: str, info: dict, dataset: str = "fmnist") -> Path:
    """Write a checkpoint (fp32 safetensors) and its JSON metadata."""
    from safetensors.torch import save_file

    path = pretrained_path(name, dataset)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return path
