"""GDRQ: Scale-Clip distribution reshaping with group-based quantization folded into BN.

Han et al., "Low-bit Quantization Needs Good Distribution" (CVPRW 2020).

* Scale-Clip on weights: each group of output filters is clipped to ``[-T, T]`` with
  ``T = k * mean|w|`` recomputed at every step and quantized uniformly (step ``T / qmax``), which
  turns bell-shaped weights into uniform-like ones. Straight-through gradient exactly inside
  ``[-T, T]`` (the paper's clip), zero outside it: also in the half step beyond ``T`` that still
  rounds to the top code, where a plain quantizer's clamp would pass it.
* Scale-Clip on activations: ``T = k * mean|x|`` tracked as an exponential moving average;
  range ``[0, T]`` (or ``[-T, T]`` for signed inputs), straight-through inside it in the same way.
* ``k`` is chosen per layer at the start unless given (``GdrqOptions``): the paper's k of 2 to 3
  suits bell-shaped tensors, but post-ReLU inputs are about half zeros, so their least-error k
  is 6 to 12, and ternary (2-bit) weight codes want about 1.6.
* Group-based quantization: G groups of filters, each with its own step. BN stays in the network
  during training; ``finalize`` folds it, and each group's step merges into the folded BN
  multiplier: the integer codes are unchanged and the layer gets one multiplier per output
  channel, the per-channel requantization scale a device applies anyway (no extra operation).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..options import Range
from ..ptq.start import mse_start
from ..quant.declare import settled_input
from ..quant.layer_specs import register_trainer, training_input_quantizer, training_weight_quantizer
from ..quant.layers import quant_layers
from ..quant.learnable import commit_stand_ins
from ..quant.quantizer import ActQuantizer, WeightQuantizer
from ..quant.spec import TensorSpec
from ..quant.uniform import fake_quantize, qparams_from_range
from ..record import record_of
from .bn import align_bn_signs, fold_steps_into_bn
from .registry import register_qat_method


@dataclass(frozen=True)
class GdrqOptions:
    """Attributes:
        k_weight: weight clipping threshold in units of mean |w| (per group). None: per layer, the
            k of least weight-quantization error at the start (about 1.6 for ternary codes, 3-4 at
            4 bit); the paper's fixed k is 2 to 3.
        k_act: activation clipping threshold in units of mean |x|. None: per layer, the start
            point's MSE clipping threshold over mean |x| (post-ReLU inputs are sparse, so this is
            6 to 12 rather than the 2 to 3 that suits bell-shaped data).
        momentum: moving-average momentum of the activation threshold.
        scale_clip: False turns Scale-Clip off for the seed's ablation: thresholds become the plain
            max |w| per group and a moving average of the batch max |x| (min/max ranges), with
            the same group quantization and BN folding.
    """

    k_weight: Annotated[float, Range(gt=0)] | None = None
    k_act: Annotated[float, Range(gt=0)] | None = None
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.99
    scale_clip: bool = True

    def __post_init__(self) -> None:
        if any(k is not None and k <= 0 for k in (self.k_weight, self.k_act)) or not 0 <= self.momentum < 1:
            raise LowbitError("gdrq: k_weight, k_act > 0 (or None: per layer) and 0 <= momentum < 1")


def scale_clip_threshold(x: Tensor, k: float | None, dims: int = 1) -> Tensor:
    """``k * mean|x|`` over all but the first ``dims`` dimensions (per group for weights); ``k=None``:
    ``max|x|`` there instead (Scale-Clip off)."""
    flat = x.detach().abs().reshape(*x.shape[:dims], -1)
    return flat.amax(-1) if k is None else k * flat.mean(-1)


def clip_ste(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``x`` unchanged in the forward pass; its gradient kept only where ``lo <= x <= hi``.

    Scale-Clip's straight-through estimator: the quantized value is what the plain quantizer
    computes (so training and the committed model agree bit for bit), but no gradient flows
    outside the clipping range, including the half step beyond it that still rounds inside.
    """
    inside = (x >= lo) & (x <= hi)
    return torch.where(inside, x, x.detach())


class ScaleClipWeight(nn.Module):
    """Per-group Scale-Clip weight quantizer: threshold recomputed from the weights at every call."""

    def __init__(self, quant: WeightQuantizer, k: float | None) -> None:
        super().__init__()
        if not quant.symmetric:
            raise LowbitError("gdrq quantizes weights symmetrically (w_symmetric=True)")
        self.quant = quant
        self.k = k

    def step(self, w: Tensor) -> Tensor:
        _, qmax = self.quant.qrange
        t = scale_clip_threshold(self.quant.grouped(w), self.k)
        return (t / max(qmax, 1)).clamp_min(1e-8)

    def forward(self, w: Tensor) -> Tensor:
        q = self.quant
        if q.binary:
            return q(w)
        rep = q.channels // q.num_groups
        s = self.step(w).repeat_interleave(rep).view(q.channel_shape(w.dim()))
        qmin, qmax = q.qrange
        t = s * qmax  # T (or the 1e-8 floor's T): the clip range of the straight-through gradient
        return fake_quantize(clip_ste(w, -t, t), s, torch.zeros_like(s), qmin, qmax)

    @torch.no_grad()
    def commit(self, layer: nn.Module) -> WeightQuantizer:
        if not self.quant.binary:
            self.quant.scale.copy_(self.step(layer.weight))
            self.quant.zero_point.zero_()
        return self.quant


class ScaleClipAct(nn.Module):
    """Activation Scale-Clip: ``T = k * mean|x|`` as a moving average, range ``[0, T]`` or ``[-T, T]``.

    Straight-through gradient inside that range only (``clip_ste``).
    """

    def __init__(self, quant: ActQuantizer, k: float | None, momentum: float, two_sided: bool) -> None:
        super().__init__()
        self.quant = quant
        self.k = k
        self.momentum = momentum
        self.two_sided = two_sided
        self.register_buffer("threshold", torch.zeros(1, device=quant.scale.device))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=quant.scale.device))

    @torch.no_grad()
    def start(self, threshold: float) -> None:
        """Begin the moving average at ``threshold`` (else the first training batch sets it)."""
        self.threshold.fill_(max(threshold, 1e-8))
        self.initialized.fill_(True)

    def qparams(self) -> tuple[Tensor, Tensor]:
        q = self.quant
        t = self.threshold.clamp_min(1e-8)
        lo = -t if self.two_sided else torch.zeros_like(t)
        return qparams_from_range(lo, t, q.bits, q.signed, q.signed)

    def forward(self, x: Tensor) -> Tensor:
        q = self.quant
        if not q.enabled:
            return x
        if self.training:
            with torch.no_grad():
                batch_t = scale_clip_threshold(x.reshape(1, -1), self.k)
                if not self.initialized:
                    self.threshold.copy_(batch_t)
                    self.initialized.fill_(True)
                else:
                    self.threshold.mul_(self.momentum).add_((1 - self.momentum) * batch_t)
        scale, zp = self.qparams()
        qmin, qmax = q.qrange
        t = self.threshold.clamp_min(1e-8)
        lo = -t if self.two_sided else torch.zeros_like(t)
        return fake_quantize(clip_ste(x, lo, t), scale, zp, qmin, qmax)

    @torch.no_grad()
    def commit(self) -> ActQuantizer:
        scale, zp = self.qparams()
        self.quant.scale.copy_(scale)
        self.quant.zero_point.copy_(zp)
        return self.quant


@register_trainer("weight", "uniform", "scaleclip")
def _scale_clip_weight(spec: TensorSpec, base: WeightQuantizer, k: float | None) -> nn.Module:
    return ScaleClipWeight(base, k)


@register_trainer("input", "uniform", "scaleclip")
def _scale_clip_input(spec: TensorSpec, base: ActQuantizer, k: float | None, momentum: float,
                      two_sided: bool) -> nn.Module:
    return ScaleClipAct(base, k, momentum, two_sided)


K_GRID = tuple(0.5 + 0.1 * i for i in range(76))  # 0.5 ... 8.0


@torch.no_grad()
def least_error_k(quant: WeightQuantizer, w: Tensor, grid: tuple[float, ...] = K_GRID) -> float:
    """The Scale-Clip ``k`` whose per-group step ``k * mean|w| / qmax`` quantizes ``w`` with least error."""
    best, best_err = grid[0], float("inf")
    for k in grid:
        err = (ScaleClipWeight(quant, k)(w) - w).pow(2).sum().item()
        if err < best_err:
            best, best_err = k, err
    return best


@torch.no_grad()
def _act_k(quant: ActQuantizer, mean_abs: float) -> float:
    """The start point's (MSE) clipping threshold in units of the observed mean |x|."""
    qmin, qmax = quant.qrange
    zp, s = quant.zero_point.float(), quant.scale.float()
    t = torch.maximum((qmax - zp) * s, (zp - qmin) * s).max().item()
    return t / mean_abs if mean_abs > 0 else 1.0


def gdrq_setup(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: GdrqOptions) -> None:
    record = record_of(qmodel)
    pairs = record.bn_pairs  # found on the FP model by the engine (tracing stops at torch.nn layers)
    align_bn_signs(qmodel, pairs)
    observers = mse_start(qmodel, calib, cfg)  # activation signs, per-layer k of the inputs
    chosen = {}
    # Scale-Clip trains the declared uniform code books (inputs with the sign calibration settled)
    for name, layer in quant_layers(qmodel):
        spec = record.declaration(name)
        inp = spec.input
        if spec.weight is not None:
            k = (opts.k_weight or least_error_k(layer.weight_quant, layer.weight)) if opts.scale_clip else None
            layer.weight_quant = training_weight_quantizer(spec.weight, layer.weight_quant, "scaleclip", k=k)
            chosen[f"{name}.weight"] = round(k, 2) if k is not None else "max"
        aq = layer.input_quant
        if inp is not None:
            two_sided = bool(aq.zero_point.item() > 0 or aq.signed)
            values = observers[name].values().abs()
            if opts.scale_clip:
                k = opts.k_act or _act_k(aq, values.mean().item())
                start = k * values.mean().item()
            else:
                k, start = None, values.max().item()
            inp = settled_input(inp, aq.signed)
            layer.input_quant = training_input_quantizer(inp, aq, "scaleclip", k=k, momentum=opts.momentum,
                                                         two_sided=two_sided)
            layer.input_quant.start(start)  # the calibration images' threshold, not one batch's
            chosen[f"{name}.input"] = round(k, 2) if k is not None else "max"
        record.declared[name] = replace(spec, input=inp)
    record.gdrq_k = chosen


def gdrq_finalize(qmodel: nn.Module, cfg: QuantConfig, opts: GdrqOptions) -> QuantConfig:
    commit_stand_ins(layer for _, layer in quant_layers(qmodel))
    pairs = record_of(qmodel).bn_pairs
    fold_steps_into_bn(qmodel, pairs, cfg)
    # what a device sees: BN folded, one multiplier per output channel (groups merged into BN)
    return cfg.with_(fold_bn=True, granularity="channel", groups=None)


register_qat_method("gdrq", gdrq_setup, gdrq_finalize, GdrqOptions,
                    "Scale-Clip distribution reshaping + group steps folded into BN (GDRQ)", fold_bn=False)
