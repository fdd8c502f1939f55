"""Trainable stand-ins for the quantizers: learned step sizes (LSQ) and learned rounding (AdaRound).

Each wraps a calibrated ``WeightQuantizer`` / ``ActQuantizer``, is swapped into a layer while it
is optimised, and writes what it learned back (``commit``) so the plain quantizers, the
artifact and the ONNX export see ordinary scales and integer weights.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .quantizer import ActQuantizer, WeightQuantizer
from .uniform import fake_quantize

# AdaRound's stretched sigmoid (Nagel et al. 2020): h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
ZETA, GAMMA = 1.1, -0.1


def scale_grad(x: Tensor, factor: float | Tensor) -> Tensor:
    """``x`` in the forward pass, gradient multiplied by ``factor`` (LSQ's step-size gradient scale;
    a tensor gives each element its own factor)."""
    return (x - x * factor).detach() + x * factor


class _LsqFakeQuant(torch.autograd.Function):
    """Per-tensor fake quantization with LSQ gradients and an optional keep-FP mask, in few passes.

    Same values and gradients as ``fake_quantize`` with a trainable scale followed by
    ``where(keep, x, out)``, but the backward pass reuses two saved tensors instead of replaying
    a dozen elementwise ops: activation quantizers dominate block reconstruction time on CPU.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                keep: Tensor | None) -> Tensor:
        v = x / scale
        r = torch.round(v).add_(zero_point)
        inside = (r >= qmin) & (r <= qmax)
        c = r.clamp_(qmin, qmax).sub_(zero_point)
        out = c * scale
        # d out / d scale: round(v) - v inside the range, the clipped code outside it
        ds = c.sub_(v.mul_(inside))
        if keep is not None:
            out = torch.where(keep, x, out)
            inside = inside | keep
            ds.masked_fill_(keep, 0.0)
        ctx.save_for_backward(inside, ds)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        inside, ds = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = (grad * ds).sum().reshape(1) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None, None, None, None


class LearnedStepWeight(nn.Module):
    """Weight fake-quantizer with a trainable step size per group (LSQ)."""

    def __init__(self, quant: WeightQuantizer, weight: Tensor, lsq_grad_scale: bool = True) -> None:
        super().__init__()
        self.quant = quant
        self.scale = nn.Parameter(quant.scale.detach().clone())
        per_group = weight.numel() / quant.num_groups
        if not lsq_grad_scale:
            self.grad_factor: float | Tensor = 1.0
        elif quant.group_bits:
            # LSQ's 1 / sqrt(n * Q_P) with each group's own Q_P (the binary channels' 1); a pruned
            # group's step multiplies codes that are all 0, so it gets no gradient at all
            lo, hi = quant.group_qranges()
            qmax = torch.maximum(lo.abs(), hi)
            self.grad_factor = torch.where(qmax > 0, (per_group * qmax.clamp_min(1)).rsqrt(), torch.zeros_like(qmax))
        else:
            self.grad_factor = 1.0 / math.sqrt(per_group * max(abs(q) for q in quant.qrange))

    def forward(self, w: Tensor) -> Tensor:
        q = self.quant
        rep = q.channels // q.num_groups
        shape = q.channel_shape(w.dim())
        s = scale_grad(self.scale.abs().clamp_min(1e-8), self.grad_factor).repeat_interleave(rep).view(shape)
        z = q.zero_point.repeat_interleave(rep).view(shape)
        qmin, qmax = q.limits(w.dim())  # per channel with per-channel widths: pruned channels stay at 0
        # binary channels of a mixed-width layer: sign codes times their learned step
        return q.with_binary_channels(fake_quantize(w, s, z, qmin, qmax, q.binary), w, s)

    @torch.no_grad()
    def commit(self, layer: nn.Module | None = None) -> WeightQuantizer:
        """The plain quantizer with the learned step (``layer`` only for the common signature)."""
        self.quant.scale.copy_(self.scale.abs().clamp_min(1e-8))
        return self.quant


class LearnedStepAct(nn.Module):
    """Activation fake-quantizer with a trainable step size and optional QDrop.

    With ``drop_prob`` > 0 and ``dropping`` on, in training mode, each element keeps its unquantized
    value with that probability (QDrop, Wei et al. 2022), which flattens the loss landscape seen by
    later blocks; in eval mode (and once committed) it always quantizes. The masks come from
    ``generator`` (on the activations' device), never from torch's global RNG, so a run is
    reproducible and leaves the caller's random state alone; without one, a generator seeded
    with 0 is made on first use. ``shared_keep``, when set (and of the input's shape), is used
    instead of a fresh mask: block reconstruction sets it on the quantizers of the block's input
    to the mask that chose FP elements there, so that those stay FP (QDrop's input mixing).
    """

    def __init__(self, quant: ActQuantizer, drop_prob: float = 0.0, lsq_grad_scale: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.quant = quant
        self.scale = nn.Parameter(quant.scale.detach().clone())
        self.drop_prob = drop_prob
        self.dropping = drop_prob > 0
        self.lsq_grad_scale = lsq_grad_scale
        self.generator = generator
        self.shared_keep: Tensor | None = None

    def _keep_mask(self, x: Tensor) -> Tensor:
        """Elements that stay unquantized: each with probability ``drop_prob``."""
        if self.generator is None:
            self.generator = torch.Generator(device=x.device).manual_seed(0)
        return torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) < self.drop_prob

    def forward(self, x: Tensor) -> Tensor:
        q = self.quant
        if not q.enabled:
            return x
        qmin, qmax = q.qrange
        s = self.scale.abs().clamp_min(1e-8)
        if self.lsq_grad_scale:
            s = scale_grad(s, 1.0 / math.sqrt(x[0].numel() * max(abs(qmin), qmax)))
        keep = None
        if self.dropping and self.training:
            shared = self.shared_keep
            keep = shared if shared is not None and shared.shape == x.shape else self._keep_mask(x)
        return _LsqFakeQuant.apply(x, s, q.zero_point, qmin, qmax, keep)

    @torch.no_grad()
    def commit(self) -> ActQuantizer:
        self.quant.scale.copy_(self.scale.abs().clamp_min(1e-8))
        return self.quant


class SoftRoundWeight(nn.Module):
    """AdaRound: integer weights ``floor(w / s) + h(V)`` with a learned rounding variable ``V``."""

    def __init__(self, quant: WeightQuantizer, weight: Tensor) -> None:
        super().__init__()
        self.quant = quant
        s, z = quant.channel_params(weight.dim())
        w = weight.detach() / s
        self.register_buffer("floor", torch.floor(w))
        rest = (w - self.floor).clamp(1e-4, 1 - 1e-4)
        # initialise so that h(V) equals the fractional part: the soft weight starts at the FP weight
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def h(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, w: Tensor) -> Tensor:
        q = self.quant
        s, z = q.channel_params(w.dim())
        qmin, qmax = q.limits(w.dim())  # per channel with per-channel widths: pruned channels stay at 0
        up = (self.v >= 0).to(w.dtype) if self.hard else self.h()
        out = (torch.clamp(self.floor + up + z, qmin, qmax) - z) * s
        mask = q.binary_mask(w.dim())
        if mask is not None:  # binary channels of a mixed-width layer keep their sign codes (nothing to round)
            out = torch.where(mask, torch.where(self.floor >= 0, 1.0, -1.0).to(w.dtype) * s, out)
        return out

    def regularizer(self, beta: float) -> Tensor:
        """AdaRound's term pushing every ``h`` to 0 or 1 (sharper as ``beta`` falls)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def commit(self, layer: nn.Module) -> WeightQuantizer:
        """Write the hard-rounded weights into ``layer.weight`` (exactly on the grid)."""
        self.hard = True
        layer.weight.copy_(self.forward(layer.weight).to(layer.weight.dtype))
        return self.quant


def commit_stand_ins(layers: Iterable[nn.Module]) -> None:
    """Swap every trainable stand-in on ``layers`` back for its plain quantizer, keeping what it learned.

    Weight stand-ins take ``commit(layer)`` (some write grid weights into it), activation ones
    ``commit()``; anything without ``commit`` is already a plain quantizer and stays.
    """
    for layer in layers:
        if hasattr(layer.weight_quant, "commit"):
            layer.weight_quant = layer.weight_quant.commit(layer)
        if hasattr(layer.input_quant, "commit"):
            layer.input_quant = layer.input_quant.commit()
