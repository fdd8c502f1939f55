"""QAT method registry: each method prepares trainable quantizers and finalizes them for export."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..options import option_types
from ..ptq.registry import Method

# setup(qmodel, calib, cfg, opts): trainable quantizers in place; finalize(qmodel, cfg, opts): plain
# quantizers back (exportable), returning the config that describes the final model (or None)
Setup = Callable[[nn.Module, Tensor, QuantConfig, Any], None]
Finalize = Callable[[nn.Module, QuantConfig, Any], "QuantConfig | None"]


@dataclass(frozen=True)
class QatMethod:
    name: str
    setup: Setup
    finalize: Finalize
    options: type | None
    description: str
    fold_bn: bool = True  # False: BN stays during training (and is folded by finalize)
    fractional_bits: bool = False  # True: a fractional w_bits is a budget, passed as option w_budget

    @property
    def option_names(self) -> frozenset[str]:
        """Names of the options this method takes."""
        return Method(self.name, self.setup, self.options, self.description).option_names

    def make_options(self, given: dict[str, Any]) -> Any:
        """The options dataclass, checked by name and declared type like a PTQ method's."""
        return Method(self.name, self.setup, self.options, self.description).make_options(given)


_QAT: dict[str, QatMethod] = {}


def register_qat_method(name: str, setup: Setup, finalize: Finalize, options: type | None = None,
                        description: str = "", fold_bn: bool = True, fractional_bits: bool = False) -> None:
    """Register a QAT method; ``options`` annotations are resolved now (TypeError if lowbit cannot check them)."""
    if options is not None:
        option_types(options)
    _QAT[name] = QatMethod(name, setup, finalize, options, description, fold_bn, fractional_bits)


def qat_methods() -> list[str]:
    _load_builtin()
    return sorted(_QAT)


def get_qat_method(name: str) -> QatMethod:
    _load_builtin()
    if not isinstance(name, str) or name not in _QAT:
        raise LowbitError(f"unknown QAT method {name!r}; known: {', '.join(sorted(_QAT))}")
    return _QAT[name]


def _load_builtin() -> None:
    from . import dmbq, gdrq, lsq  # noqa: F401  (registers built-in QAT methods)
