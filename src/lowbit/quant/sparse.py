"""Sparse activation quantization (TSQ, Wang et al. CVPR 2018): a zero threshold above the first level.

Codes of a non-negative input ``x`` with step ``delta`` and threshold ``eps``::

    code(x) = 0                                  if x <= eps
              clamp(round(x / delta), 1, qmax)   otherwise

so the levels stay the uniform ``0, delta, ..., qmax * delta`` of an ordinary unsigned quantizer,
and ``eps`` only decides which small positive values become exact zeros (a share of them, fitted
as a quantile). The same codes come from the plain uniform quantizer applied to the *gated* input
``gate(x) = where(x > eps, max(x, delta), 0)`` (rounding is monotone, ``round(delta / delta) = 1``),
which is how every deployment path computes them: the simulation, the integer reference and the
ONNX graph (``Greater``, ``Max``, ``Where`` before its ``QuantizeLinear``) run the same float ops.

* ``SparseActQuantizer``: the plain, exportable quantizer (an ``ActQuantizer`` with a
  ``threshold`` buffer, stored in artifacts under ``<layer>.input_quant.threshold``).
* ``SparseStepAct``: its trainable stand-in (TSQ step 1): learned step (LSQ gradient), threshold
  tracked as a moving-average quantile of the positive inputs, straight-through gradient inside
  the active range ``(eps, qmax * delta]`` only.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import LowbitError
from .learnable import scale_grad
from .quantizer import ActQuantizer, spec_tensor
from .spec import TensorSpec, sparse_gate


def sparse_codes(x: Tensor, threshold: Tensor, step: Tensor, qmax: int) -> Tensor:
    """Integer codes (as floats) of the sparse quantizer (see the module docstring)."""
    return torch.clamp(torch.round(sparse_gate(x, threshold, step) / step), 0, qmax)


def positive_quantile(values: Tensor, share: float, limit: int = 1 << 20) -> float:
    """The ``share`` quantile of the strictly positive ``values`` (0 when there are none or share is 0).

    At most ``limit`` values are used (a strided subset: torch.quantile has a size limit, and
    training refreshes the threshold at every step, where sorting a whole batch costs too much).
    """
    flat = values.detach().reshape(-1)
    if flat.numel() > limit:
        flat = flat[:: math.ceil(flat.numel() / limit)]
    pos = flat.float()
    pos = pos[pos > 0]
    if share <= 0 or pos.numel() == 0:
        return 0.0
    return torch.quantile(pos, min(share, 1.0)).item()


@torch.no_grad()
def fit_sparse_step(values: Tensor, threshold: float, qmax: int, candidates: int = 100, floor: float = 0.0) -> float:
    """Step ``delta`` of least squared error of the sparse quantizer on ``values``.

    The threshold of a candidate step is ``max(threshold, floor * delta)`` (``floor`` 0: fixed).
    """
    x = values.detach().reshape(-1).float()
    if x.numel() > 1 << 18:
        x = x[:: math.ceil(x.numel() / (1 << 18))]
    above = x[x > threshold]
    top = above.max().item() if above.numel() else max(threshold, 1e-8)
    best, best_err = max(top / qmax, 1e-8), float("inf")
    for i in range(candidates):
        step = torch.tensor(max(top * (1.0 - i / candidates) / qmax, 1e-8))
        t = torch.clamp(step * floor, min=threshold)
        err = (sparse_codes(x, t, step, qmax) * step - x).pow(2).sum().item()
        if err < best_err:
            best, best_err = step.item(), err
    return best


class SparseActQuantizer(ActQuantizer):
    """Unsigned per-tensor activation quantizer whose codes are 0 up to ``threshold`` (TSQ's sparse codes)."""

    CODE_BOOK = "sparse"  # the quant.spec kind that spec() returns

    def __init__(self, bits: int | None, threshold: float = 0.0) -> None:
        super().__init__(bits, symmetric=False)
        self.register_buffer("threshold", torch.full((1,), float(threshold)))

    @classmethod
    def from_quantizer(cls, quant: ActQuantizer, threshold: float | Tensor) -> "SparseActQuantizer":
        """A sparse quantizer with ``quant``'s bits, scale and state and the given threshold."""
        if quant.signed or bool(quant.zero_point.ne(0).any()):
            raise LowbitError("sparse activation codes need an unsigned input quantizer with zero point 0 "
                              "(non-negative inputs)")
        new = cls(quant.bits).to(quant.scale.device)
        new.scale.copy_(quant.scale)
        new.enabled = quant.enabled
        new.threshold.fill_(float(threshold))
        return new

    def gate(self, x: Tensor) -> Tensor:
        """The gated input (``sparse_gate``) that the uniform quantizer turns into the sparse codes."""
        return sparse_gate(x, self.threshold.to(x.dtype), self.scale.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None or not self.enabled:
            return super().forward(x)
        return super().forward(self.gate(x))

    def quantize(self, x: Tensor):
        return super().quantize(self.gate(x))

    def spec(self) -> TensorSpec:
        """This quantizer's code book: sparse codes (zero up to the threshold, uniform levels above)."""
        if self.observer is not None or self.bits is None:
            raise LowbitError("an activation quantizer that is not calibrated has no spec")
        return TensorSpec("sparse", self.bits, False, False, False, scale=spec_tensor(self.scale),
                          zero_point=spec_tensor(self.zero_point), threshold=spec_tensor(self.threshold))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold.item():.4g}"


class _SparseSTE(torch.autograd.Function):
    """Sparse fake quantization with a learned step: STE inside ``(eps, qmax * step]``, LSQ step gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, threshold: Tensor, qmax: int) -> Tensor:
        codes = sparse_codes(x, threshold, step, qmax)
        v = x / step
        active = x > threshold
        inside = active & (v <= qmax)
        # d out / d step: code - x / step inside the range, the top code above it, 0 where gated to 0
        ds = torch.where(inside, codes - v, codes)
        ctx.save_for_backward(inside, ds)
        return codes * step

    @staticmethod
    def backward(ctx, grad: Tensor):
        inside, ds = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = (grad * ds).sum().reshape(1) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None, None


class SparseStepAct(nn.Module):
    """Trainable stand-in of ``SparseActQuantizer`` (TSQ step 1).

    The step is learned with LSQ's gradient; the threshold is the ``sparsity`` quantile of the
    positive inputs, kept as a moving average (``momentum``) over training batches, or fixed
    (``track=False``) at the value it starts with; it never goes below ``floor`` times the step
    (``floor`` 0.5: values under half a step, which cost less as 0 than as the first level
    ``delta``, are always zeroed; with ``sparsity`` 0 the threshold then follows the learned step).
    """

    def __init__(self, quant: SparseActQuantizer, sparsity: float, momentum: float = 0.99, track: bool = True,
                 floor: float = 0.0) -> None:
        super().__init__()
        self.quant = quant
        self.scale = nn.Parameter(quant.scale.detach().clone())
        self.sparsity = sparsity
        self.momentum = momentum
        self.track = track
        self.floor = floor

    def forward(self, x: Tensor) -> Tensor:
        q = self.quant
        if not q.enabled:
            return x
        if self.training and self.track and self.sparsity > 0:
            with torch.no_grad():
                t = positive_quantile(x, self.sparsity, limit=1 << 15)
                q.threshold.mul_(self.momentum).add_((1 - self.momentum) * t)
        _, qmax = q.qrange
        s = scale_grad(self.scale.abs().clamp_min(1e-8), 1.0 / math.sqrt(x[0].numel() * qmax))
        threshold = torch.maximum(q.threshold, self.floor * s.detach()) if self.floor > 0 else q.threshold
        return _SparseSTE.apply(x, s, threshold.to(x.dtype), qmax)

    @torch.no_grad()
    def commit(self) -> SparseActQuantizer:
        self.quant.scale.copy_(self.scale.abs().clamp_min(1e-8))
        if self.floor > 0:
            self.quant.threshold.clamp_(min=self.floor * self.quant.scale.item())
        return self.quant
