"""Stateful quantizer modules: one for weights (per tensor / channel / group), one for activations."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import LowbitError
from .spec import GRANULARITIES, TensorSpec, effective_groups, storage_bits, width_range  # noqa: F401
from .uniform import (QuantResult, binary_fake_quantize, check_bits, fake_quantize, int_range, qparams_from_range,
                      to_int)

def spec_tensor(t: Tensor) -> Tensor:
    """A quantizer parameter as a spec holds it: a detached float32 CPU copy."""
    return t.detach().float().cpu().clone()


class WeightQuantizer(nn.Module):
    """Signed weight quantizer with one scale (and zero point) per group of output channels.

    ``axis`` is the weight dimension that holds the output channels: 0 for Conv / Linear
    weights, 1 for ConvTranspose weights ``(in, out / groups, k...)``, as in PyTorch's and ONNX's
    per-axis quantization. ``channels`` is that dimension's size.
    """

    CODE_BOOK = "uniform"  # the quant.spec kind that spec() returns

    def __init__(self, bits: int, channels: int, granularity: str = "channel", groups: int | None = None,
                 symmetric: bool = True, narrow: bool = True, axis: int = 0) -> None:
        super().__init__()
        self.bits = check_bits(bits, "weight bits")
        self.channels = channels
        self.axis = axis
        self.symmetric = symmetric
        self.narrow = narrow
        self.granularity = granularity
        self.num_groups = effective_groups(channels, granularity, groups)
        self.register_buffer("scale", torch.ones(self.num_groups))
        self.register_buffer("zero_point", torch.zeros(self.num_groups))
        self.enabled = True
        # Per-group widths (mixed precision inside the layer, e.g. ACIQ-Mix); None: every group at
        # ``bits``. When set, ``bits`` is their maximum (the width codes are stored and exported at)
        # and each group's codes are clamped to its own, narrower range, so the stored codes give
        # exactly the values of the mixed-width simulation. A plain tuple, not a buffer: state dicts
        # of every other quantizer stay as they are (the artifact stores the widths in its manifest).
        self.group_bits: tuple[int, ...] | None = None

    @property
    def signed(self) -> bool:
        return self.symmetric

    def set_group_bits(self, bits: Sequence[int] | None) -> None:
        """Give each scale group its own width (``None``: one width for all, ``bits`` unchanged).

        Widths are 0..16: signed 1-bit groups hold the binary sign code ``{-1, +1}`` times their
        scale (as a whole 1-bit layer does), unsigned ones the affine ``{0, 1}``; 0 prunes the
        group (its codes are 0 and its zero point must be 0: every value is exactly 0). The
        layer's ``bits`` becomes the storage width (``quant.spec.storage_bits``: the widest, 2 when
        1-bit groups sit beside pruned ones). Scales are not touched: calibrate them for these
        widths (``calibrate`` does, per width).
        """
        if bits is None:
            self.group_bits = None
            return
        if any(isinstance(b, bool) or int(b) != b or not 0 <= b <= 16 for b in bits):
            raise LowbitError(f"group_bits must be integers from 0 to 16, got {sorted(set(bits))}")
        widths = tuple(int(b) for b in bits)
        if len(widths) != self.num_groups:
            raise LowbitError(f"group_bits needs one width per scale group ({self.num_groups}), got {len(widths)}")
        if max(widths) == 0:
            raise LowbitError("group_bits prunes every group: keep at least one (a layer of only pruned channels "
                              "is its bias; leave it in float or remove it from the model)")
        self.group_bits = widths
        self.bits = storage_bits(widths)

    @property
    def mean_bits(self) -> float:
        """Average width over the weight's elements (every group holds as many of them)."""
        return sum(self.group_bits) / len(self.group_bits) if self.group_bits else float(self.bits)

    def group_qranges(self) -> tuple[Tensor, Tensor]:
        """Per-group integer bounds (float tensors of ``num_groups``); every group's the same without group_bits."""
        widths = self.group_bits or (self.bits,) * self.num_groups
        lo, hi = zip(*(width_range(b, self.signed, self.narrow) for b in widths))
        dev = self.scale.device
        return torch.tensor(lo, dtype=torch.float32, device=dev), torch.tensor(hi, dtype=torch.float32, device=dev)

    def limits(self, ndim: int) -> tuple[int | Tensor, int | Tensor]:
        """Clamp bounds for a weight of ``ndim`` dims: ints, or per-channel tensors with group_bits."""
        if not self.group_bits:
            return self.qrange
        rep = self.channels // self.num_groups
        shape = self.channel_shape(ndim)
        return tuple(t.repeat_interleave(rep).view(shape) for t in self.group_qranges())  # type: ignore[return-value]

    def binary_mask(self, ndim: int) -> Tensor | None:
        """Channels of a mixed-width layer that hold binary codes (signed 1-bit groups), shaped to broadcast
        over a weight of ``ndim`` dims; None when there are none (or the whole layer is binary)."""
        if not self.group_bits or not self.signed or self.binary or 1 not in self.group_bits:
            return None
        mask = torch.tensor([b == 1 for b in self.group_bits], device=self.scale.device)
        return mask.repeat_interleave(self.channels // self.num_groups).view(self.channel_shape(ndim))

    def with_binary_channels(self, out: Tensor, w: Tensor, scale: Tensor) -> Tensor:
        """``out`` with the binary channels of a mixed-width layer (signed 1-bit groups) replaced by their
        sign codes times ``scale``, as a whole 1-bit layer computes them (``binary_fake_quantize``)."""
        mask = self.binary_mask(w.dim())
        if mask is None:
            return out
        return torch.where(mask, binary_fake_quantize(w, scale), out)

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.signed, self.narrow)

    @property
    def binary(self) -> bool:
        return self.signed and self.bits == 1

    def grouped(self, w: Tensor) -> Tensor:
        """``w`` as ``G x n`` rows, one per scale group."""
        return (w.movedim(self.axis, 0) if self.axis else w).reshape(self.num_groups, -1)

    def channel_shape(self, ndim: int) -> tuple[int, ...]:
        """View shape that puts a per-channel vector on the channel axis of an ``ndim``-dim weight."""
        return tuple(-1 if d == self.axis else 1 for d in range(ndim))

    def channel_params(self, ndim: int) -> tuple[Tensor, Tensor]:
        """Scale and zero point broadcast to a weight of ``ndim`` dims (along the channel axis)."""
        rep = self.channels // self.num_groups
        shape = self.channel_shape(ndim)
        return (self.scale.repeat_interleave(rep).view(shape), self.zero_point.repeat_interleave(rep).view(shape))

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Set scale/zero point from per-group clipping bounds."""
        scale, zp = qparams_from_range(lo, hi, self.bits, self.signed, self.symmetric, self.narrow)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)

    @torch.no_grad()
    def calibrate(self, w: Tensor, range_fn: Callable[..., tuple[Tensor, Tensor]], **kwargs) -> None:
        """Fit scales to ``w`` with a range estimator (binary codes always use mean |w|)."""
        rows = self.grouped(w.detach().float())
        if self.binary:
            self.scale.copy_(rows.abs().mean(1).clamp_min(1e-8))
            self.zero_point.zero_()
            return
        if self.group_bits:
            self._calibrate_widths(rows, range_fn, **kwargs)
            return
        lo, hi = range_fn(rows, bits=self.bits, signed=self.signed, symmetric=self.symmetric,
                          narrow=self.narrow, **kwargs)
        self.set_range(lo, hi)

    def _calibrate_widths(self, rows: Tensor, range_fn: Callable[..., tuple[Tensor, Tensor]], **kwargs) -> None:
        """Per-group widths: each width's groups fitted by ``range_fn`` at that width (binary groups: mean |w|).

        A pruned group gets the scale a group at the storage width would (any positive scale
        gives its zero values; this one keeps an integer bias of the channel on a sensible grid)
        and zero point 0.
        """
        scale = torch.empty_like(self.scale)
        zero = torch.zeros_like(self.zero_point)
        widths = torch.tensor(self.group_bits)
        for b in torch.unique(widths).tolist():
            idx = (widths == b).nonzero().flatten().to(rows.device)
            sub = rows[idx]
            if b == 1 and self.signed:
                scale[idx] = sub.abs().mean(1).clamp_min(1e-8).to(scale.dtype)
                continue
            fit = b or self.bits
            lo, hi = range_fn(sub, bits=fit, signed=self.signed, symmetric=self.symmetric, narrow=self.narrow,
                              **kwargs)
            s, z = qparams_from_range(lo, hi, fit, self.signed, self.symmetric, self.narrow)
            scale[idx] = s.to(scale.dtype)
            zero[idx] = z.to(zero.dtype) if b else 0.0
        self.scale.copy_(scale)
        self.zero_point.copy_(zero)

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        s, z = self.channel_params(w.dim())
        qmin, qmax = self.limits(w.dim())
        return self.with_binary_channels(fake_quantize(w, s, z, qmin, qmax, self.binary), w, s)

    def quantize(self, w: Tensor) -> QuantResult:
        """Integers, simulated values, scale and zero point for ``w``."""
        s, z = self.channel_params(w.dim())
        qmin, qmax = self.limits(w.dim())
        q = to_int(w, s, z, qmin, qmax, self.binary)
        mask = self.binary_mask(w.dim())
        if mask is not None:
            q = torch.where(mask, torch.where(w >= 0, 1, -1).to(q.dtype), q)
        return QuantResult(self.dequantize(q.to(w.dtype)), q, self.scale, self.zero_point, self.bits)

    def dequantize(self, q: Tensor) -> Tensor:
        """Real values of integer codes ``q`` (same shape as the weight)."""
        s, z = self.channel_params(q.dim())
        return q * s if self.binary else (q - z) * s

    def spec(self) -> TensorSpec:
        """This quantizer's code book: uniform codes, one scale and zero point per group (a CPU copy)."""
        return TensorSpec("uniform", self.bits, self.signed, self.symmetric, self.narrow, self.granularity,
                          self.channels, self.num_groups, self.axis, self.group_bits, spec_tensor(self.scale),
                          spec_tensor(self.zero_point))

    def extra_repr(self) -> str:
        axis = f", axis={self.axis}" if self.axis else ""
        if self.group_bits:
            axis += f", group_bits=mean {self.mean_bits:.3g} in [{min(self.group_bits)}, {max(self.group_bits)}]"
            if 0 in self.group_bits:
                axis += f", pruned={self.group_bits.count(0)}"
        return f"bits={self.bits}, groups={self.num_groups}, symmetric={self.symmetric}{axis}, enabled={self.enabled}"


class ActObserver:
    """Running min/max plus a bounded random sample of the values a quantizer saw.

    The samples are copies on the CPU, never views of the observed tensor: models may change a
    layer's input in place after the layer ran (``x += conv(x)``, ``relu_``), and a kept view
    would then hold values the layer never saw.
    """

    def __init__(self, sample_per_batch: int = 65536, seed: int = 0) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")
        self.samples: list[Tensor] = []
        self.sample_per_batch = sample_per_batch
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        self.lo = min(self.lo, flat.min().item())
        self.hi = max(self.hi, flat.max().item())
        if flat.numel() > self.sample_per_batch:
            idx = torch.randint(0, flat.numel(), (self.sample_per_batch,), generator=self.gen).to(flat.device)
            sample = flat[idx]  # advanced indexing: a new tensor
        else:
            sample = flat
        # copy=True: on the CPU, .cpu() / .float() / reshape return the live tensor itself or a view of it
        self.samples.append(sample.to("cpu", copy=True))

    def values(self) -> Tensor:
        """Sampled values with the exact extremes included (so min/max stays exact)."""
        return torch.cat(self.samples + [torch.tensor([self.lo, self.hi])])


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer: unsigned after ReLU, asymmetric (or symmetric) otherwise."""

    CODE_BOOK = "uniform"  # the quant.spec kind that spec() returns

    def __init__(self, bits: int | None, symmetric: bool = False) -> None:
        super().__init__()
        self.bits = None if bits is None else check_bits(bits, "activation bits")
        self.symmetric = symmetric
        self.signed = False
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.enabled = bits is not None
        self.observer: ActObserver | None = None

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.signed, narrow=False)

    def start_observing(self, seed: int = 0) -> None:
        self.observer = ActObserver(seed=seed)

    def stop_observing(self) -> ActObserver:
        obs, self.observer = self.observer, None
        if obs is None or not obs.samples:
            raise LowbitError("an activation quantizer saw no data during calibration")
        return obs

    def _codes_signed(self, lo: float) -> bool:
        # signed codes only for symmetric quantizers of inputs that go negative (1 bit stays affine)
        return lo < 0 and self.symmetric and self.bits > 1

    def set_range(self, lo: float | Tensor, hi: float | Tensor) -> None:
        """Set scale/zero point so that ``[lo, hi]`` is covered."""
        lo_t = torch.as_tensor(lo, dtype=torch.float32).reshape(1)
        hi_t = torch.as_tensor(hi, dtype=torch.float32).reshape(1)
        self.signed = self._codes_signed(lo_t.item())
        scale, zp = qparams_from_range(lo_t, hi_t, self.bits, self.signed, self.signed)
        self.scale.copy_(scale.to(self.scale.device))
        self.zero_point.copy_(zp.to(self.zero_point.device))

    @torch.no_grad()
    def calibrate(self, values: Tensor, range_fn: Callable[..., tuple[Tensor, Tensor]], **kwargs) -> None:
        """Fit the range to sampled ``values`` with an estimator."""
        row = values.reshape(1, -1).float()
        signed = self._codes_signed(row.min().item())
        lo, hi = range_fn(row, bits=self.bits, signed=signed, symmetric=signed, narrow=False, **kwargs)
        self.set_range(lo, hi)

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not self.enabled:
            return x
        qmin, qmax = self.qrange
        return fake_quantize(x, self.scale, self.zero_point, qmin, qmax)

    def spec(self) -> TensorSpec:
        """This quantizer's code book: per-tensor uniform codes (a CPU copy); LowbitError while it observes."""
        if self.observer is not None or self.bits is None:
            raise LowbitError("an activation quantizer that is not calibrated has no spec")
        # symmetric codes (zero point 0) exactly when signed: ``symmetric`` itself only steers calibration
        return TensorSpec("uniform", self.bits, self.signed, self.signed, False, scale=spec_tensor(self.scale),
                          zero_point=spec_tensor(self.zero_point))

    def quantize(self, x: Tensor) -> QuantResult:
        qmin, qmax = self.qrange
        q = to_int(x, self.scale, self.zero_point, qmin, qmax)
        return QuantResult((q.to(x.dtype) - self.zero_point) * self.scale, q, self.scale, self.zero_point, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, enabled={self.enabled}"
