"""LSQ: learned step size quantization (Esser et al. 2020), the QAT anchor.

Starts from the MSE-clipping PTQ model, then trains the latent weights and every step size with
LSQ's gradient scale ``1 / sqrt(n * qmax)``. BN stays in the network while it trains, as in the
paper: a low-bit start point (ternary weights lose most of the accuracy before training) recovers
only when BN can re-normalise the layers, and with BN folded away SGD diverges from there. At the
end BN folds into the per-channel steps exactly (``qat.bn``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from ..config import QuantConfig
from ..ptq.start import mse_start
from ..quant.declare import settled_input
from ..quant.layer_specs import training_input_quantizer, training_weight_quantizer
from ..quant.layers import quant_layers
from ..quant.learnable import commit_stand_ins
from ..record import record_of
from .bn import align_bn_signs, fold_steps_into_bn
from .registry import register_qat_method


@dataclass(frozen=True)
class LsqOptions:
    """Attributes:
        grad_scale: LSQ's step-size gradient scaling (off: plain straight-through gradients).
    """

    grad_scale: bool = True


def lsq_setup(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: LsqOptions) -> None:
    record = record_of(qmodel)
    align_bn_signs(qmodel, record.bn_pairs)  # before calibration: asymmetric grids see final signs
    mse_start(qmodel, calib, cfg)
    # learned steps on the declared uniform code books (inputs with the sign calibration settled)
    for name, layer in quant_layers(qmodel):
        spec = record.declaration(name)
        inp = spec.input
        if spec.weight is not None:
            layer.weight_quant = training_weight_quantizer(spec.weight, layer.weight_quant, weight=layer.weight,
                                                           lsq_grad_scale=opts.grad_scale)
        if inp is not None:
            inp = settled_input(inp, layer.input_quant.signed)
            layer.input_quant = training_input_quantizer(inp, layer.input_quant, lsq_grad_scale=opts.grad_scale)
        record.declared[name] = replace(spec, input=inp)


def lsq_finalize(qmodel: nn.Module, cfg: QuantConfig, opts: LsqOptions) -> QuantConfig:
    commit_stand_ins(layer for _, layer in quant_layers(qmodel))
    fold_steps_into_bn(qmodel, record_of(qmodel).bn_pairs, cfg)
    # what a device sees: BN folded, one multiplier per output channel
    return cfg.with_(fold_bn=True, granularity="channel", groups=None)


# per-channel widths: each channel trains its own step on its own grid (binary channels: sign times
# step; pruned ones stay 0), and BN folds into the steps channel by channel as for one width
register_qat_method("lsq", lsq_setup, lsq_finalize, LsqOptions,
                    "learned step size quantization (LSQ), from the MSE PTQ start point", fold_bn=False,
                    channel_bits=True)
