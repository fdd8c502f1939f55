"""Small helpers to get and replace submodules by dotted name."""
from __future__ import annotations

from torch import nn


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (works inside Sequential/ModuleList too)."""
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    setattr(parent, child, module)
