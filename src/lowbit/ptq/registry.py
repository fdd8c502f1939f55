"""Method registry: every quantization method is a named handler with its own options dataclass."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError

Handler = Callable[[nn.Module, Tensor, QuantConfig, Any], None]


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    options: type | None
    description: str

    def make_options(self, given: dict[str, Any]) -> Any:
        """Build the options dataclass; unknown names raise a LowbitError listing known ones."""
        allowed = {f.name for f in fields(self.options)} if self.options else set()
        unknown = sorted(set(given) - allowed)
        if unknown:
            hint = ", ".join(sorted(allowed)) or "none"
            raise LowbitError(f"unknown option(s) {unknown} for method {self.name!r}; "
                              f"its options: {hint}; common options: see lowbit.QuantConfig")
        return self.options(**given) if self.options else None


_METHODS: dict[str, Method] = {}


def register_method(name: str, options: type | None = None, description: str = "") -> Callable[[Handler], Handler]:
    """Decorator registering ``handler(qmodel, calib, cfg, opts)`` under ``name``."""
    def deco(fn: Handler) -> Handler:
        _METHODS[name] = Method(name, fn, options, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


def methods() -> list[str]:
    """Names of all registered methods."""
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    _load_builtin()
    if not isinstance(name, str) or name not in _METHODS:
        raise LowbitError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_table() -> list[dict[str, str]]:
    _load_builtin()
    return [{"name": m.name, "description": m.description} for m in sorted(_METHODS.values(), key=lambda m: m.name)]


def _load_builtin() -> None:
    from . import baselines, bitsplit, distill, reconstruct  # noqa: F401  (registers built-in methods on first use)
    from . import kl, lapq  # noqa: F401
