"""LSQ: learned step size quantization (Esser et al. 2020), the QAT anchor.

Starts from the MSE-clipping PTQ model (BN folded), then trains the latent weights and every
step size with LSQ's gradient scale ``1 / sqrt(n * qmax)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..config import QuantConfig
from ..ptq.baselines import MseOptions, mse
from ..quant.layers import quant_layers
from ..quant.learnable import LearnedStepAct, LearnedStepWeight, commit_stand_ins
from .registry import register_qat_method


@dataclass(frozen=True)
class LsqOptions:
    """Attributes:
        grad_scale: LSQ's step-size gradient scaling (off: plain straight-through gradients).
    """

    grad_scale: bool = True


def lsq_setup(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: LsqOptions) -> None:
    mse(qmodel, calib, cfg, MseOptions())
    for _, layer in quant_layers(qmodel):
        if layer.weight_quant.enabled:
            layer.weight_quant = LearnedStepWeight(layer.weight_quant, layer.weight, opts.grad_scale)
        if layer.input_quant.enabled:
            layer.input_quant = LearnedStepAct(layer.input_quant, lsq_grad_scale=opts.grad_scale)


def lsq_finalize(qmodel: nn.Module, cfg: QuantConfig, opts: LsqOptions) -> None:
    commit_stand_ins(layer for _, layer in quant_layers(qmodel))


register_qat_method("lsq", lsq_setup, lsq_finalize, LsqOptions,
                    "learned step size quantization (LSQ), from the MSE PTQ start point")
