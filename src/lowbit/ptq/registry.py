"""Method registry: every quantization method is a named handler with its own options dataclass."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..options import check_options, option_types

Handler = Callable[[nn.Module, Tensor, QuantConfig, Any], None]


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    options: type | None
    description: str
    # QuantConfig fields this method defaults differently (e.g. brecq/qdrop: asymmetric weights, as
    # published); an explicit option or a config= object wins over them
    config_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def option_names(self) -> frozenset[str]:
        """Names of the options this method takes (its options dataclass's init fields)."""
        return frozenset(f.name for f in fields(self.options) if f.init) if self.options else frozenset()

    def make_options(self, given: dict[str, Any]) -> Any:
        """Build the options dataclass from ``given``, checked by name and declared type.

        Raises:
            LowbitError: an unknown name (listing the known ones), or a value that does not match
                its field's annotation (naming the method and the option), or one the options'
                own ``__post_init__`` refuses.
        """
        allowed = self.option_names
        unknown = sorted(set(given) - allowed)
        if unknown:
            hint = ", ".join(sorted(allowed)) or "none"
            raise LowbitError(f"unknown option(s) {unknown} for method {self.name!r}; "
                              f"its options: {hint}; common options: see lowbit.QuantConfig")
        if not self.options:
            return None
        # types before construction, so that __post_init__ range checks never compare a str
        return self.options(**check_options(self.options, given, f"method {self.name!r}"))


_METHODS: dict[str, Method] = {}


def register_method(name: str, options: type | None = None, description: str = "",
                    config_defaults: Mapping[str, Any] | None = None) -> Callable[[Handler], Handler]:
    """Decorator registering ``handler(qmodel, calib, cfg, opts)`` under ``name``.

    ``options`` is a dataclass whose field annotations declare each option's type (see
    ``lowbit.options``); they are resolved here, so an annotation lowbit cannot check fails at
    registration with a TypeError rather than when the method is used. A handler that reports
    results keeps them in the model's record, ``lowbit.record_of(qmodel).extra[name]``.
    ``config_defaults`` are QuantConfig fields the method defaults differently from ``QuantConfig``
    (checked on use, like any config value).
    """
    if options is not None:
        option_types(options)
    from ..config import CONFIG_FIELDS  # late: config imports the quantizers, not the registry

    unknown = sorted(set(config_defaults or {}) - CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"config_defaults of method {name!r} name no QuantConfig field: {unknown}")

    def deco(fn: Handler) -> Handler:
        _METHODS[name] = Method(name, fn, options, description or (fn.__doc__ or "").strip().split("\n")[0],
                                dict(config_defaults or {}))
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
    from . import aciq_mix, kl, lapq  # noqa: F401
