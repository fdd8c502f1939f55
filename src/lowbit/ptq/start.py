"""The starting points that learned methods share: MSE clipping, and the teachers.

Every learned method, PTQ (``brecq``, ``qdrop``, ``distill``) and QAT (``lsq``, ``gdrq``, ``tsq``,
and ``dmbq`` for layers above its multi-bit range), starts from the Lp-error clipping search of
method ``mse``. It lives here, not in a method's handler, so that a method depends on the start
point, never on another method; ``ptq.baselines`` registers ``mse`` on top of it. The teachers:
learned PTQ methods fit the student to a copy of itself run with quantizers off
(``mse_start_with_teacher``), a distilling QAT run to the FP model (``fp_teacher``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated

from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..options import Range
from ..quant.quantizer import ActObserver
from ..quant.ranges import lp_grid_search_range, lp_search_range
from .common import calibrate_inputs, calibrate_weights, observe_fp_inputs


@dataclass(frozen=True)
class MseOptions:
    """Lp clipping search (LAPQ / BRECQ style).

    Attributes:
        p_weight: norm of the weight error (2 = MSE).
        p_act: norm of the activation error (2.4 as in LAPQ, BRECQ, QDrop).
        candidates: clip ratios tried, shrinking the min/max range by ``shrink`` each.
        shrink: step of the clip ratio.
        zero_point_search: weights with a zero point (``w_symmetric=False``) search clip width and
            integer zero point jointly (QDrop's observer) instead of shrinking their min/max.
    """

    p_weight: Annotated[float, Range(gt=0)] = 2.0
    p_act: Annotated[float, Range(gt=0)] = 2.4
    candidates: Annotated[int, Range(ge=1)] = 100
    shrink: Annotated[float, Range(gt=0, lt=1)] = 0.01
    zero_point_search: bool = False

    def __post_init__(self) -> None:
        if self.p_weight <= 0 or self.p_act <= 0 or self.candidates < 1 or not 0 < self.shrink < 1:
            raise LowbitError("mse options: p_weight, p_act > 0, candidates >= 1 and 0 < shrink < 1")


def mse_start(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig,
              opts: MseOptions = MseOptions()) -> dict[str, ActObserver]:
    """Calibrate every range by Lp-error search; returns the FP input statistics it searched on."""
    if opts.zero_point_search:
        calibrate_weights(qmodel, lp_grid_search_range, p=opts.p_weight, candidates=opts.candidates)
    else:
        calibrate_weights(qmodel, lp_search_range, p=opts.p_weight, candidates=opts.candidates, shrink=opts.shrink)
    observers = observe_fp_inputs(qmodel, calib, cfg)
    calibrate_inputs(qmodel, observers, lp_search_range, p=opts.p_act, candidates=opts.candidates,
                     shrink=opts.shrink)
    return observers


def mse_start_with_teacher(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig,
                           init: MseOptions = MseOptions()) -> nn.Module:
    """Calibrate ``qmodel`` with MSE clipping, the start of every learned PTQ method, and return its teacher.

    The teacher is a copy in eval mode; run it under ``quantizers_disabled`` to get the FP network
    with exactly the student's structure (folded BN, same module names).
    """
    mse_start(qmodel, calib, cfg, init)
    return copy.deepcopy(qmodel).eval()


def fp_teacher(model: nn.Module) -> nn.Module:
    """The FP teacher of a distilling QAT run: a copy of ``model`` in eval mode (the caller's stays as it is)."""
    return copy.deepcopy(model).eval()
