"""Baseline PTQ methods: TF-Lite min/max, Lp-error clipping search, ACIQ analytic clipping.

The Lp-error search is the shared start point of the learned methods: it lives in ``ptq.start``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..quant.quantizer import ActObserver
from ..quant.ranges import aciq_range, minmax_range
from .common import calibrate_inputs, calibrate_weights, observe_fp_inputs
from .registry import register_method
from .start import MseOptions, mse_start
from .start import mse_start_with_teacher  # noqa: F401  (re-exported: lowbit.ptq.baselines.mse_start_with_teacher)


@register_method("minmax", description="TF-Lite style: scale from max|w| and observed activation min/max")
def minmax(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: None) -> None:
    calibrate_weights(qmodel, minmax_range)
    calibrate_inputs(qmodel, observe_fp_inputs(qmodel, calib, cfg), minmax_range)


@register_method("mse", MseOptions, description="Lp-error clipping search (p=2 weights, p=2.4 activations)")
def mse(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: MseOptions) -> dict[str, ActObserver]:
    """Calibrate every range by Lp-error search (``ptq.start.mse_start``); returns the FP input statistics."""
    return mse_start(qmodel, calib, cfg, opts)


@dataclass(frozen=True)
class AciqOptions:
    """ACIQ analytic clipping.

    Attributes:
        dist: assumed distribution, "laplace" (b = mean |x - mean|) or "gauss" (sigma).
    """

    dist: Literal["laplace", "gauss"] = "laplace"

    def __post_init__(self) -> None:
        if self.dist not in ("laplace", "gauss"):
            raise LowbitError(f"aciq dist must be 'laplace' or 'gauss', got {self.dist!r}")


@register_method("aciq", AciqOptions, description="ACIQ analytic clipping (Laplace or Gaussian prior)")
def aciq(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: AciqOptions) -> None:
    calibrate_weights(qmodel, aciq_range, dist=opts.dist)
    calibrate_inputs(qmodel, observe_fp_inputs(qmodel, calib, cfg), aciq_range, dist=opts.dist)
