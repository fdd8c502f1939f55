"""QAT method registry: each method prepares trainable quantizers and finalizes them for export."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..options import option_types
from ..ptq.registry import Method

# setup(qmodel, calib, cfg, opts): trainable quantizers in place, each built from the code book the method
# declares for it (quant.declare; quant.layer_specs.training_weight_quantizer / training_input_quantizer,
# stored in the record's ``declared``); finalize(qmodel, cfg, opts): plain
# quantizers back (exportable), returning the config that describes the final model (or None).
# A method registered with wants_context=True gets a FinalizeContext as a fourth argument.
Setup = Callable[[nn.Module, Tensor, QuantConfig, Any], None]
Finalize = Callable[..., "QuantConfig | None"]


@dataclass(frozen=True)
class FinalizeContext:
    """What a method that keeps working after training (TSQ's layer-wise step, a fine-tune) needs.

    Attributes:
        calib: the calibration images setup saw.
        x_train, y_train: the training data.
        val: validation ``(images, labels)`` or None.
        train_config: the run's ``QatConfig``.
        seed: the run's seed.
        device: where the model trained.
        progress: whether progress bars are shown.
        log: where log lines go.
        teacher: the FP model in eval mode when the run distils (``kd_weight`` > 0), else None.
    """

    calib: Tensor
    x_train: Tensor
    y_train: Tensor
    val: tuple[Tensor, Tensor] | None
    train_config: Any
    seed: int
    device: torch.device
    progress: bool
    log: Callable[[str], Any]
    teacher: nn.Module | None = None


@dataclass(frozen=True)
class QatMethod:
    name: str
    setup: Setup
    finalize: Finalize
    options: type | None
    description: str
    fold_bn: bool = True  # False: BN stays during training (and is folded by finalize)
    wants_context: bool = False  # finalize(qmodel, cfg, opts, FinalizeContext)
    fractional_bits: bool = False  # True: a fractional w_bits is a budget, passed as option w_budget
    channel_bits: bool = False  # True: honours per-channel weight widths in layer_bits (0 prunes)

    @property
    def option_names(self) -> frozenset[str]:
        """Names of the options this method takes."""
        return Method(self.name, self.setup, self.options, self.description).option_names

    def make_options(self, given: dict[str, Any]) -> Any:
        """The options dataclass, checked by name and declared type like a PTQ method's."""
        return Method(self.name, self.setup, self.options, self.description).make_options(given)


_QAT: dict[str, QatMethod] = {}


def register_qat_method(name: str, setup: Setup, finalize: Finalize, options: type | None = None,
                        description: str = "", fold_bn: bool = True, wants_context: bool = False,
                        fractional_bits: bool = False, channel_bits: bool = False) -> None:
    """Register a QAT method; ``options`` annotations are resolved now (TypeError if lowbit cannot check them)."""
    if options is not None:
        option_types(options)
    _QAT[name] = QatMethod(name, setup, finalize, options, description, fold_bn, wants_context, fractional_bits,
                           channel_bits)


def qat_methods() -> list[str]:
    _load_builtin()
    return sorted(_QAT)


def get_qat_method(name: str) -> QatMethod:
    _load_builtin()
    if not isinstance(name, str) or name not in _QAT:
        raise LowbitError(f"unknown QAT method {name!r}; known: {', '.join(sorted(_QAT))}")
    return _QAT[name]


def _load_builtin() -> None:
    from . import dmbq, gdrq, lsq, tsq  # noqa: F401  (registers built-in QAT methods)
