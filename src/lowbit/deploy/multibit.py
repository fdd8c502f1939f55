"""ONNX export of multi-bit (DMBQ) models.

DMBQ alphas are arbitrary reals, so a layer's weights are not on an integer grid: they are stored
as what they are, ``w = sum_i alpha_i b_i`` per output channel. The packed artifact stores them as
sign planes + alphas like every other code book (``deploy.artifact``, version 4); this module
writes the ONNX graph.

ONNX (no ``DequantizeLinear``): each DMBQ weight is rebuilt in the graph from its int8 sign planes,
``W = ReduceSum_i(Cast(B_i) * alpha_i)`` (the alphas per output channel; constant folding off, so
the planes stay in the file), feeding the
float ``Conv``/``Gemm``; each DMBQ input quantizer is a sum of steps over its sorted levels,
``Q(x) = L_0 + sum_k (L_k - L_(k-1)) * (x > t_k)`` with midpoints ``t_k`` (``Greater``, ``Cast``,
``Mul``, ``Add``). What an integer device runs instead: one binary convolution per weight plane
(and per input plane: ``{0,1}`` bits of the level index), ``y = sum_i sum_j alpha_i beta_j
(B_i * A_j)`` — ``M_w x M_a`` accumulations of +-1 / 0-1 products (XNOR/AND + popcount), each
scaled by ``alpha_i beta_j`` in the epilogue. That form is described here, not emitted.
"""
from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LowbitError
from ..files import atomic_write
from ..quant import spec as qspec
from ..quant.layer_specs import code_books, layer_specs
from ..quant.layers import quant_layers
from ..quant.spec import TensorSpec
from .artifact import require_quantized

DEFAULT_OPSET = 17  # plain float operators only: any opset ONNX Runtime runs


def is_multibit_model(qmodel: Any) -> bool:
    """Whether a model holds DMBQ quantizers (and so its ONNX graph is written by this module)."""
    return isinstance(qmodel, nn.Module) and "multibit" in code_books(qmodel)


class _PlaneWeight(nn.Module):
    """Export form of a multibit weight: ``sum_i alpha_i * float(B_i)`` from int8 sign planes."""

    def __init__(self, spec: TensorSpec, weight: Tensor) -> None:
        super().__init__()
        m = max(spec.bits, 1)
        planes = torch.zeros(m, *qspec.group_rows(spec, weight).shape, dtype=torch.int8)  # pruned: planes 0, alphas 0
        planes[:spec.bits] = qspec.bit_planes(spec, qspec.codes(spec, weight.detach())).cpu()
        moved = weight.movedim(spec.axis, 0) if spec.axis else weight
        planes_t = planes.view((m,) + tuple(moved.shape))
        if spec.axis:
            planes_t = planes_t.movedim(1, spec.axis + 1)
        self.register_buffer("planes", planes_t.contiguous())
        alpha = torch.zeros(spec.channels, m)
        alpha[:, :spec.bits] = spec.alphas
        view = [m] + [1] * weight.dim()
        view[spec.axis + 1] = spec.channels
        self.register_buffer("alpha", alpha.T.contiguous().view(view))

    def forward(self, w: Tensor) -> Tensor:
        return (self.planes.to(w.dtype) * self.alpha).sum(0)


class _StepAct(nn.Module):
    """Export form of a multibit input: ``L_0 + sum_k (L_k - L_(k-1)) * (x > t_k)``."""

    def __init__(self, spec: TensorSpec) -> None:
        super().__init__()
        lv = qspec.levels(spec)[0].sort().values
        self.register_buffer("low", lv[:1].clone())
        self.register_buffer("steps", (lv[1:] - lv[:-1]).clone())
        self.register_buffer("mids", ((lv[1:] + lv[:-1]) / 2).clone())

    def forward(self, x: Tensor) -> Tensor:
        out = self.low.expand_as(x)
        for k in range(self.mids.numel()):
            # strictly greater: a tie at a midpoint goes to the lower level, as dmbq.assign does
            out = out + (x > self.mids[k]).to(x.dtype) * self.steps[k]
        return out


@torch.no_grad()
def export_multibit_onnx(qmodel: nn.Module, path: str | os.PathLike, opset: int | None = None,
                         input_shape: tuple[int, ...] | None = None) -> Path:
    """Write the DequantizeLinear-free ONNX graph of a DMBQ model (see the module docstring)."""
    import onnx

    from .onnx_qdq import fix_adaptive_pools

    info = require_quantized(qmodel)
    path = Path(path)
    twin = copy.deepcopy(qmodel).cpu().eval()
    layers = dict(quant_layers(twin))
    for spec in layer_specs(twin):
        layer = layers[spec.name]
        if spec.weight is not None and spec.weight.kind == "multibit":
            layer.weight_quant = _PlaneWeight(spec.weight, layer.weight)
        if spec.input is not None and spec.input.kind == "multibit":
            layer.input_quant = _StepAct(spec.input)
    shape = tuple(input_shape) if input_shape else tuple(info.get("input_shape") or ())
    if not shape:
        raise LowbitError("ONNX export of a multi-bit model needs input_shape= (the model has no recorded one)")
    example = torch.zeros((1,) + shape)
    buffer = io.BytesIO()
    try:
        if example.dim() == 4:
            fix_adaptive_pools(twin, example)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")  # the legacy exporter's deprecation notices are noise
            # no constant folding: it would multiply the planes out into one float weight
            torch.onnx.export(twin, (example,), buffer, dynamo=False, opset_version=opset or DEFAULT_OPSET,
                              do_constant_folding=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:
        raise LowbitError(f"torch.onnx.export could not trace the multi-bit model: {type(exc).__name__}: {exc}") from None
    proto = onnx.load_from_string(buffer.getvalue())
    if any(node.op_type == "DequantizeLinear" for node in proto.graph.node):
        raise LowbitError("internal: the multi-bit ONNX graph must not hold DequantizeLinear")
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return path


def multibit_onnx_ops(path: str | os.PathLike) -> dict[str, int]:
    """Count of each operator type in an ONNX file (to check what the graph is made of)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts

