"""BatchNorm kept during QAT and folded at the end: sign alignment up front, exact folding after.

QAT methods that train with BN (``fold_bn=False`` in their registration) call ``align_bn_signs``
in setup, so every BN multiplier starts positive, and ``fold_steps_into_bn`` in finalize: each
layer's steps (per tensor, group or channel) merge with its BN multiplier into one per-channel
scale, the integer codes unchanged, and BN disappears from the network.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..config import QuantConfig
from ..graph.fold import apply_fold_structure
from ..graph.modules import get_submodule
from ..quant.layers import per_output_channel, quant_layers
from ..quant.declare import per_channel
from ..quant.layer_specs import weight_quantizer


def align_bn_signs(qmodel: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Make every BN multiplier positive without changing the function.

    Negating filter c, gamma_c and running_mean_c leaves conv -> BN unchanged; with positive
    multipliers the folded per-channel scales stay positive and the codes need no sign flip.
    """
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = get_submodule(qmodel, conv_name), get_submodule(qmodel, bn_name)
            if bn.weight is None:
                continue
            neg = bn.weight < 0
            if not neg.any():
                continue
            sign = torch.where(neg, -1.0, 1.0).to(conv.weight.dtype)
            conv.weight.mul_(per_output_channel(conv, sign))  # dim 1 of ConvTranspose weights
            if conv.bias is not None:
                conv.bias.mul_(sign)
            bn.weight.mul_(sign)
            bn.running_mean.mul_(sign)


@torch.no_grad()
def fold_steps_into_bn(qmodel: nn.Module, pairs: list[tuple[str, str]], cfg: QuantConfig) -> float:
    """Fold every BN after a quantized conv; its steps become per-channel multipliers (exact).

    Every layer ends with per-channel scales (groups repeated) and the same integer codes (mirrored
    where a BN multiplier turned negative). Returns the largest code change a symmetric range
    forced (0 when the folding is exact).
    """
    layers = dict(quant_layers(qmodel))
    worst = 0.0
    for name, layer in layers.items():
        wq = layer.weight_quant
        if not wq.enabled:
            continue
        mult = None
        bn_name = next((b for c, b in pairs if c == name), None)
        if bn_name is not None:
            bn = get_submodule(qmodel, bn_name)
            inv_std = torch.rsqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
            mult = gamma * inv_std
            bias = layer.bias if layer.bias is not None else torch.zeros_like(inv_std)
            new_bias = (bias - bn.running_mean) * mult + beta
            if layer.bias is None:
                layer.bias = nn.Parameter(new_bias)
            else:
                layer.bias.copy_(new_bias)
        if hasattr(wq, "fold_multiplier"):  # non-uniform levels (DMBQ) scale themselves, codes unchanged
            if mult is not None:
                wq.fold_multiplier(layer, mult)
            continue
        codes = wq.quantize(layer.weight).int_value.to(layer.weight.dtype)
        s, z = wq.channel_params(layer.weight.dim())
        scale = s.reshape(-1).clone()
        if mult is None:
            mult = torch.ones_like(scale)
        # the same code book with per-channel scales (per-channel widths: each channel keeps its own range)
        channel = weight_quantizer(per_channel(wq.spec()), scale.device)
        view = wq.channel_shape(codes.dim())
        negative = (mult < 0).view(view)
        qmin, qmax = channel.limits(codes.dim())  # ints, or per-channel bounds with per-channel widths
        if wq.symmetric or wq.binary:
            flipped = torch.where(negative, -codes, codes)
            zero = torch.zeros_like(z)
        else:  # mirror codes and zero point inside [qmin, qmax]: exact for asymmetric grids
            flipped = torch.where(negative, qmin + qmax - codes, codes)
            zero = torch.where(negative, qmin + qmax - z, z)
        exact = flipped.clamp(qmin, qmax)
        worst = max(worst, (exact - flipped).abs().max().item())
        # a zero BN multiplier (e.g. zero-initialised residual branches) makes the channel constant:
        # its codes become the zero point and it keeps its step, so every scale stays positive
        dead = mult == 0
        exact = torch.where(dead.view(view), zero.expand_as(exact), exact)
        channel.scale.copy_(torch.where(dead, scale, scale * mult.abs()))
        channel.zero_point.copy_(zero.reshape(-1).to(channel.zero_point.dtype))
        layer.weight.copy_((exact - zero) * channel.scale.view(view))
        channel.enabled = wq.enabled
        layer.weight_quant = channel
    apply_fold_structure(qmodel, pairs)
    if worst:
        warnings.warn(f"qat: a BN multiplier turned negative during training; codes clipped by {worst:.0f}",
                      stacklevel=2)
    return worst


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every process of the DDP group.

    torch's SyncBatchNorm runs on GPUs only; this one uses autograd-aware ``all_reduce`` and so
    works with gloo on CPU as well as NCCL. The gradient through the shared statistics is summed
    over processes, so with DDP's gradient averaging it equals one process on the whole batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / c])])
        with warnings.catch_warnings():  # its successor in _functional_collectives has no autograd
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(local)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1).clamp_min(1))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


@contextmanager
def global_batch_norm(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Make every BatchNorm2d of ``model`` compute its statistics across processes while inside.

    The modules keep their identity and state (only their class changes and is restored), so
    optimizers, checkpoints and ``state_dict`` keys are unaffected.
    """
    swapped = [m for m in model.modules() if type(m) is nn.BatchNorm2d] if enabled else []
    for m in swapped:
        m.__class__ = GlobalBatchNorm2d
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = nn.BatchNorm2d
