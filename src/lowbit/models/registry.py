"""Model registry: ``@register_model`` and ``create_model`` by name (timm style)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import LowbitError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered models."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; ``kwargs`` go to its constructor.

    The constructor arguments are remembered on the module as ``lowbit_arch`` so that an
    exported artifact can rebuild the architecture without the caller passing a model.
    """
    if name not in _MODELS:
        raise LowbitError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    try:
        model = _MODELS[name](**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # unknown or ill-typed constructor arguments
        if not kwargs:  # the defaults failing is a bug of the constructor, not a user error
            raise
        raise LowbitError(f"cannot build {name} with arguments {kwargs}: {exc}") from None
    model.lowbit_arch = {"name": name, "kwargs": dict(kwargs)}
    return model
