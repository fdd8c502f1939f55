"""ONNX QDQ export: integer weight initializers at their real width, Q/DQ on quantized inputs.

The graph is built in two steps. ``torch.export`` captures a copy of the quantized model in which
every quantizer is a marker (the custom op ``lowbit::mark``, tagged with the layer name), torch's
``torch.export``-based ONNX exporter translates it (onnxscript; each marker becomes a
``lowbit::Mark`` node), and the markers are then rewritten with ``onnx.helper``:

* weight marker -> ``DequantizeLinear(codes, scale, zero_point, axis)``; ``codes`` is an
  INT2 / INT4 / INT8 / INT16 initializer (UINT* with per-channel zero points for asymmetric
  weights) holding exactly the simulation's integer codes: 3-bit codes in an INT4 container,
  binary {-1, +1} codes in INT2 with zero point 0. Group scales are written per output channel
  (each group's scale repeated), per-tensor scales as a scalar. ``axis`` is the weight's output
  channel axis: 0 for Conv (1-D kernels for Conv1d) and Gemm, 1 for ConvTranspose, whose
  weight is ``(in, out / groups, kH, kW)``.
* input marker -> ``[Clip] -> QuantizeLinear -> DequantizeLinear`` with the input quantizer's
  scale and zero point. Codes travel in UINT8/INT8 (16-bit types above 8 bit); narrower codes
  are first clipped in float to their code range, which equals the simulation's clamp after
  rounding, so ONNX Runtime reproduces the simulated codes exactly.

Three choices keep ONNX Runtime 1.32's optimizer from changing the arithmetic (each was seen to
fail or to move top-1 by more than a point otherwise):

* activations never use UINT4/UINT2: ClipQuantFusion raises on them and the QLinearConv fusion
  accepts them without having a kernel;
* 2-bit weights get a trailing unit dimension and a Reshape: the QLinearConv/QGemm fusion
  accepts INT2 weights it has no kernel for;
* the float bias of a layer with a quantized input is added after the Conv (or given to Gemm as
  a 1 x N tensor): WeightBiasQuantization would round it to int32 at ``s_x * s_w``, which the
  simulation does not do.

Mixed widths. Each layer's weights sit in the container of their own width (per-layer maps mix
INT8, INT4 and INT2 freely). Per-channel widths inside one layer are stored in the layer's widest
container, each channel's codes in its own (narrower) range: exact, one Conv per layer. The other
form, one Conv per container width joined by Concat and a Gather that restores the channel order,
was measured on every zoo model and a non-zoo CNN (``benchmarks/mixed_export.py``, section
``mixed-export`` of RESULTS.md): the same predictions in ONNX Runtime and a file a few percent
smaller, but ONNX Runtime has no sub-byte kernels (every weight is dequantized to float either
way), so the split only adds Conv/Concat/Gather nodes and runs slower on most models; the widest
container is kept. Pruned (0-bit) channels are removed from the producer's weights, scales and
bias and from its consumers' input channels where that is exact (``deploy.onnx_prune``: through
ReLU/Clip/Q-DQ and depthwise convs to plain convs, a nonzero constant folded into an unpadded
consumer's bias); elsewhere (residual adds, concats, pooling heads, padded consumers of a nonzero
constant) they stay as zero codes, and the metadata says why (``pruned_channels`` per layer).

Opsets: the default is the lowest from 18 on that stores every weight at its width (18 for 5..8
bit, 21 for 3..4 and 9..16 bit, 25 for 1..2 bit); an explicit one too old for the weights raises
LowbitError. torch writes opset 18 and ``onnx.version_converter`` lifts the graph to newer opsets.
Markers make the node-to-layer mapping independent of the exporter's naming and keep it from
fusing an unfolded BatchNorm into a quantized weight.

What each marker becomes comes from the layer's ``quant.spec.LayerSpec`` (``quant.layer_specs``,
checked to reproduce the simulation): the exporter never looks inside a quantizer.

The deprecated TorchScript exporter (``dynamo=False``) is used only where the new one cannot be:
a model that ``torch.export`` cannot capture (data-dependent Python control flow) and an
explicit opset below 18 (the version converter has no downgrade adapters for common ops); a
UserWarning names the reason each time (see ``trace_to_onnx``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
import os
import time
import warnings
from collections import Counter
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import LowbitError
from ..quant import spec as qspec
from ..quant.layer_specs import layer_specs
from ..quant.layers import QUANT_LAYERS, layer_kind, quant_layers
from ..quant.spec import LayerSpec, sparse_gate
from ..files import atomic_write
from .artifact import require_quantized

try:  # onnx is a hard dependency, but keep the import error readable
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as exc:  # pragma: no cover
    raise ImportError("lowbit ONNX export needs the 'onnx' package") from exc

MARK_DOMAIN = "lowbit"
MIN_OPSET = 13               # per-axis DequantizeLinear (opsets below 18 come from the TorchScript exporter)
TORCHLIB_OPSET = 18          # the opset torch's torch.export-based exporter writes; the default's floor
TORCH_MAX_OPSET = 20         # highest opset of torch's TorchScript exporter; newer ones are converted
EXPORTERS = ("torch.export", "torchscript")  # the default, and PyTorch's deprecated tracer (see trace_to_onnx)
DEFAULT_EXPORTER = "torch.export"  # what exporter=None means (the test suite switches it; tests/conftest.py)
DEFAULT_IMAGE_SIZE = 28      # Fashion-MNIST, when neither the model record nor the caller gives a shape

# ONNX integer types: (bits, signed) -> (TensorProto type, first opset where Q/DQ accept it)
_TYPES: dict[tuple[int, bool], tuple[int, int]] = {
    (2, True): (TensorProto.INT2, 25), (2, False): (TensorProto.UINT2, 25),
    (4, True): (TensorProto.INT4, 21), (4, False): (TensorProto.UINT4, 21),
    (8, True): (TensorProto.INT8, 13), (8, False): (TensorProto.UINT8, 13),
    (16, True): (TensorProto.INT16, 21), (16, False): (TensorProto.UINT16, 21),
}
_GUARDED_TYPES = (TensorProto.INT2, TensorProto.UINT2)
_NP_TYPES = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
             TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32}


def container_bits(bits: int) -> int:
    """Width of the smallest ONNX integer type that holds ``bits``-wide codes."""
    for width in (2, 4, 8, 16):
        if bits <= width:
            return width
    raise LowbitError(f"{bits}-bit codes have no ONNX integer type")


def weight_type(bits: int, signed: bool) -> tuple[int, int]:
    """``(TensorProto type, minimum opset)`` of a weight stored at its real width."""
    return _TYPES[(container_bits(bits), signed)]


def activation_type(bits: int, signed: bool) -> tuple[int, bool]:
    """``(TensorProto type, needs_clip)`` of an activation quantizer's codes.

    Activation codes travel in 8-bit (up to 8 bit) or 16-bit containers: ONNX Runtime 1.32's
    QDQ optimizers mishandle sub-byte activations (ClipQuantFusion raises on a UINT4 zero point
    and the QLinearConv fusion accepts UINT4 inputs it has no kernel for). Narrower codes get a
    float Clip to their range in front of the QuantizeLinear.
    """
    width = 8 if bits <= 8 else 16
    return _TYPES[(width, signed)][0], bits != width


def _type_name(dtype: int) -> str:
    return TensorProto.DataType.Name(dtype)


def int_initializer(name: str, codes: np.ndarray, dtype: int) -> TensorProto:
    """An integer initializer of ``dtype`` (sub-byte types packed low bits first, as ONNX specifies)."""
    codes = np.asarray(codes, dtype=np.int64)
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = dtype
    tensor.dims.extend(codes.shape)
    flat = codes.reshape(-1)
    if dtype in (TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2, TensorProto.UINT2):
        width = 4 if dtype in (TensorProto.INT4, TensorProto.UINT4) else 2
        per_byte = 8 // width
        nibbles = (flat & (2 ** width - 1)).astype(np.uint8)
        nibbles = np.pad(nibbles, (0, -len(nibbles) % per_byte)).reshape(-1, per_byte)
        packed = np.zeros(len(nibbles), dtype=np.uint8)
        for i in range(per_byte):
            packed |= nibbles[:, i] << np.uint8(width * i)
        tensor.raw_data = packed.tobytes()
    else:
        tensor.raw_data = flat.astype(_NP_TYPES[dtype]).astype(np.dtype(_NP_TYPES[dtype]).newbyteorder("<")).tobytes()
    return tensor


# --------------------------------------------------------------------------------------- markers
# A marker is an identity op that survives every exporter as one node tagged with its layer. For
# torch.export it is the custom op ``lowbit::mark`` (torch.export keeps custom ops as they are, and
# ``_mark_to_onnx`` writes it as a ``lowbit::Mark`` node); the TorchScript fallback uses ``_Mark``,
# an autograd Function with a ``symbolic``.
def _define_mark_op() -> Any:
    """The ``torch.ops.lowbit.mark`` custom op (defined once per process)."""
    try:
        return torch.ops.lowbit.mark.default  # already defined (e.g. this module was reloaded)
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("lowbit::mark", mutates_args=())
    def mark(x: Tensor, tag: str) -> Tensor:  # noqa: ARG001
        return x.clone()

    @mark.register_fake
    def _(x: Tensor, tag: str) -> Tensor:  # noqa: ARG001
        return torch.empty_like(x)

    return torch.ops.lowbit.mark.default


_MARK_OP = _define_mark_op()


class _Mark(torch.autograd.Function):
    """Identity in PyTorch; a ``lowbit::Mark`` node in the TorchScript exporter's graph (fallback)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tag: str) -> Tensor:  # noqa: ARG004
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, tag: str) -> Any:
        return g.op(f"{MARK_DOMAIN}::Mark", x, tag_s=tag).setType(x.type())


class _Marker(nn.Module):
    """Stands in for a quantizer during export."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag
        self.legacy = False  # True while the TorchScript fallback traces

    def forward(self, x: Tensor) -> Tensor:
        return _Mark.apply(x, self.tag) if self.legacy else _MARK_OP(x, self.tag)


def _mark_schema() -> None:
    """Register the ONNX schema of ``lowbit::Mark`` (onnxscript builds nodes only for known schemas)."""
    from onnx.defs import OpSchema

    if onnx.defs.has("Mark", MARK_DOMAIN):
        return
    onnx.defs.register_schema(OpSchema(
        "Mark", MARK_DOMAIN, 1, doc="lowbit export marker: identity tagged with a quantizer (removed before saving)",
        inputs=[OpSchema.FormalParameter("x", "T")], outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"],
                           "float tensors")],
        attributes=[OpSchema.Attribute("tag", OpSchema.AttrType.STRING, "w:<layer> or in:<layer>")]))


def _mark_to_onnx(x: Any, tag: str) -> Any:
    """onnxscript translation of ``lowbit::mark``: one ``lowbit::Mark`` node."""
    from onnxscript import values

    return values.Opset(MARK_DOMAIN, 1).Mark(x, tag=tag)


# ------------------------------------------------------------------------------- quantizer specs
@dataclass
class WeightSpec:
    """What one quantized weight becomes: codes in a container type plus per-channel DQ params."""

    codes: np.ndarray        # integers, weight shape
    scale: np.ndarray        # float32, one per channel of the weight's channel axis (or one)
    zero_point: np.ndarray   # integers, same shape as scale
    bits: int
    signed: bool
    dtype: int
    min_opset: int
    axis: int = 0            # the weight's output channel axis (1 for ConvTranspose)
    ndim: int = 4            # the weight's (and the layer output's) number of dimensions
    out_scale: np.ndarray | None = None  # float32 scale of every output channel (or one): int32 bias steps
    custom_forward: bool = False  # a subclass's own forward: its bias stays float even with int32_bias
    pruned: tuple[int, ...] = ()  # output channels of 0-bit (pruned) groups: zero codes, zero point 0


@dataclass
class InputSpec:
    """What one quantized input becomes: [Clip] -> Q -> DQ with scalar params."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    bits: int
    signed: bool
    threshold: float | None = None  # sparse codes (quant.sparse): 0 up to it, exported as a gate before Q


def weight_spec(layer_spec: LayerSpec, weight: Tensor, custom_forward: bool = False) -> WeightSpec:
    """The ONNX form of a layer's quantized weight: its spec's integer codes of ``weight`` (the layer's
    parameter), in the container of their width, with per-channel DQ parameters."""
    spec = layer_spec.weight
    if spec is None or spec.kind != "uniform":
        raise LowbitError(f"layer {layer_spec.name}: a {spec.kind if spec else 'float'} weight has no ONNX QDQ "
                          "export (only uniform integer codes are exportable)")
    codes = qspec.codes(spec, weight.detach().float().cpu()).to(torch.int64)
    signed = spec.signed
    dtype, min_opset = weight_type(spec.bits, signed)
    if dtype in _GUARDED_TYPES:
        # ORT 1.32 fuses DQ(2-bit weight) -> Conv/Gemm -> Q into QLinearConv/QGemm, which have no
        # 2-bit kernels; a trailing unit dim plus a Reshape keeps the DQ out of that fusion
        codes = codes.unsqueeze(-1)
    rep = spec.channels // spec.num_groups
    scale = spec.scale.repeat_interleave(rep)
    zero = spec.zero_point.repeat_interleave(rep)
    out_scale = qspec.output_channel_scale(spec, layer_spec.out_channels)
    if spec.num_groups == 1:
        scale, zero, out_scale = scale[:1], zero[:1], out_scale[:1]
    pruned = tuple(c for c, b in enumerate(np.repeat(spec.widths, rep)) if b == 0) if spec.axis == 0 else ()
    return WeightSpec(codes.numpy(), scale.numpy().astype(np.float32),
                      zero.round().to(torch.int64).numpy(), spec.bits, signed, dtype, min_opset,
                      spec.axis, len(layer_spec.weight_shape), out_scale.numpy().astype(np.float32), custom_forward,
                      pruned)


# Largest |weight code| whose pairwise products with UINT8 activations (<= 255) cannot overflow int16:
# 2 * 255 * 64 = 32640 <= 32767.
_U8S8_SAFE_CODE = 64


def saturates_u8s8(weight: WeightSpec, inp: InputSpec | None) -> bool:
    """Whether ONNX Runtime's fused integer conv could saturate on these codes (x86 without VNNI).

    With 8-bit input codes ONNX Runtime fuses DQ -> Conv/Gemm -> Q into QLinearConv/QGemm. Its x86
    kernel for UINT8 inputs and INT8 weights multiplies with VPMADDUBSW on AVX2-only CPUs, which sums
    two products into int16 and saturates once a weight code exceeds 64 in magnitude: on an AVX2
    AMD EPYC, ResNet-20 W8A8 kept identical logits on 52% of images (100% with UINT8 weights).
    """
    return (weight.dtype == TensorProto.INT8 and inp is not None and inp.bits == 8
            and int(np.abs(weight.codes).max(initial=0)) > _U8S8_SAFE_CODE)


def as_unsigned_weight(weight: WeightSpec) -> WeightSpec:
    """The same weight values as UINT8 codes: codes and zero points shifted by 128 (exact), which ONNX
    Runtime runs with its saturation-free U8U8 kernels."""
    return dataclasses.replace(weight, codes=weight.codes.astype(np.int64) + 128,
                               zero_point=weight.zero_point.astype(np.int64) + 128,
                               signed=False, dtype=TensorProto.UINT8)


def input_spec(layer_spec: LayerSpec) -> InputSpec:
    """Scalar Q/DQ parameters of a layer's quantized input (uniform or sparse codes)."""
    spec = layer_spec.input
    if spec is None or spec.kind not in ("uniform", "sparse"):
        raise LowbitError(f"layer {layer_spec.name}: a {spec.kind if spec else 'float'} input has no ONNX "
                          "QuantizeLinear equivalent")
    qmin, qmax = qspec.qrange(spec)
    return InputSpec(spec.scale.item(), int(round(spec.zero_point.item())), qmin, qmax, spec.bits, spec.signed,
                     spec.threshold.item() if spec.kind == "sparse" else None)


def collect_specs(qmodel: nn.Module) -> tuple[dict[str, WeightSpec], dict[str, InputSpec]]:
    """ONNX forms of every quantized weight and input, from the model's checked layer specs
    (``quant.layer_specs``); LowbitError for layers lowbit cannot export."""
    for name, module in qmodel.named_modules():
        if (hasattr(module, "weight_quant") or hasattr(module, "input_quant")) and not isinstance(module, QUANT_LAYERS):
            raise LowbitError(f"layer {name} ({type(module).__name__}) is a quantized layer type that ONNX export "
                              "does not support (only lowbit's quantized Conv1d, Conv2d, ConvTranspose2d, Linear)")
    layers = dict(quant_layers(qmodel))
    weights, inputs = {}, {}
    for spec in layer_specs(qmodel, verify=True):
        layer = layers[spec.name]
        if spec.weight is not None:
            weights[spec.name] = weight_spec(spec, layer.weight, bool(layer.custom_forward))
        if spec.input is not None:
            inputs[spec.name] = input_spec(spec)
    return weights, inputs


def required_opset(weights: dict[str, WeightSpec]) -> int:
    """Lowest opset that stores every weight at its real width."""
    return max([MIN_OPSET] + [w.min_opset for w in weights.values()])


def default_opset(weights: dict[str, WeightSpec], inputs: dict[str, InputSpec]) -> int:
    """Lowest opset from ``TORCHLIB_OPSET`` (18) on that stores every weight at its real width and
    runs 16-bit activation codes."""
    opset = max(required_opset(weights), TORCHLIB_OPSET)
    if any(spec.bits > 8 for spec in inputs.values()):
        opset = max(opset, _TYPES[(16, False)][1])
    return opset


def check_opset(opset: int, weights: dict[str, WeightSpec], inputs: dict[str, InputSpec]) -> None:
    """LowbitError when ``opset`` cannot hold some weight at its bit width (or 16-bit activations)."""
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise LowbitError(f"opset must be an integer from {MIN_OPSET} to {newest}, got {opset!r}")
    for name, spec in weights.items():
        if spec.min_opset > opset:
            raise LowbitError(f"layer {name}: {spec.bits}-bit weights are stored as {_type_name(spec.dtype)}, "
                              f"which needs opset >= {spec.min_opset} (got opset {opset})")
    for name, spec in inputs.items():
        dtype, _ = activation_type(spec.bits, spec.signed)
        if _TYPES[(16, spec.signed)][0] == dtype and opset < 21:
            raise LowbitError(f"layer {name}: {spec.bits}-bit activations need 16-bit QuantizeLinear, "
                              f"opset >= 21 (got opset {opset})")


# --------------------------------------------------------------------------------------- tracing
def example_input(qmodel: nn.Module, input_shape: Sequence[int] | None) -> Tensor:
    """A one-input example: given shape, the recorded one, or the first layer's channels at 28x28
    (at length 28 for Conv1d). Shapes without the batch dimension get one."""
    info = getattr(qmodel, "lowbit_info", None) or {}
    order = info.get("layer_order") or [n for n, _ in quant_layers(qmodel)]
    first = dict(quant_layers(qmodel))[order[0]]
    spatial = layer_kind(first).spatial
    recorded = input_shape is None and info.get("input_shape") is not None
    if input_shape is None:
        input_shape = info.get("input_shape")
    if input_shape is None:
        channels = first.in_channels if spatial else first.in_features
        input_shape = (channels,) + (DEFAULT_IMAGE_SIZE,) * spatial
        recorded = True
    shape = tuple(int(d) for d in input_shape)
    if recorded or (spatial and len(shape) == spatial + 1) or (not spatial and len(shape) in (1, 3)):
        shape = (1,) + shape  # one input without the batch dimension
    return torch.zeros(shape)


def _marked_copy(qmodel: nn.Module, weights: dict[str, WeightSpec], inputs: dict[str, InputSpec]) -> nn.Module:
    """A CPU copy of ``qmodel`` whose enabled quantizers are markers (disabled ones do nothing)."""
    marked = copy.deepcopy(qmodel).cpu().eval()
    for name, layer in quant_layers(marked):
        if name in weights:  # the traced values are dropped later; keep them equal to the DQ output anyway
            spec, ndim = weights[name], layer.weight.dim()
            codes = spec.codes.reshape(layer.weight.shape)
            value = (codes - _per_channel(spec.zero_point, ndim, spec.axis)) * _per_channel(spec.scale, ndim, spec.axis)
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(value).float())
        layer.weight_quant = _Marker(f"w:{name}") if name in weights else nn.Identity()
        layer.input_quant = _Marker(f"in:{name}") if name in inputs else nn.Identity()
        if name in inputs and inputs[name].threshold is not None:
            # sparse codes: the gate where(x > t, max(x, step), 0) is traced as ordinary float ops
            # (Greater, Max, Where) in front of the Q/DQ pair, which then yields the sparse codes exactly
            layer.input_quant = nn.Sequential(_SparseGate(inputs[name].threshold, inputs[name].scale),
                                              layer.input_quant)
    for module in marked.modules():
        # in-place activations (ReLU6(inplace=True), ...) reach torch.export as hardtanh_ & co., which
        # its decomposition pass expands through reference implementations with symbolic shapes
        # (0.2 s per call on a 2-core CPU: half of a MobileNetV2 export); the out-of-place op exports
        # to the same ONNX node directly
        if getattr(module, "inplace", None) is True:
            module.inplace = False
    return marked


class _SparseGate(nn.Module):
    """``where(x > threshold, max(x, step), 0)`` with constants (exported as Greater / Max / Where)."""

    def __init__(self, threshold: float, step: float) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float32))
        self.register_buffer("step", torch.tensor(step, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return sparse_gate(x, self.threshold, self.step)


def _per_channel(values: np.ndarray, ndim: int, axis: int = 0) -> np.ndarray:
    return values.reshape(tuple(-1 if d == axis else 1 for d in range(ndim)))


class _FixedAdaptivePool2d(nn.Module):
    """Adaptive average or max pooling for one input size, as the slices PyTorch pools over.

    torch's ONNX exporter handles adaptive pooling only when the output size divides the input
    size; for any other size known at export the regions are fixed, so each output cell becomes a
    Slice and a ReduceMean/ReduceMax (summing the same elements as PyTorch's kernel does).
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], reduce: str) -> None:
        super().__init__()
        def bounds(n: int, m: int) -> list[tuple[int, int]]:  # PyTorch's start/end index rule
            return [((i * n) // m, -((-(i + 1) * n) // m)) for i in range(m)]
        self.rows, self.cols = bounds(in_hw[0], out_hw[0]), bounds(in_hw[1], out_hw[1])
        self.reduce = reduce

    def forward(self, x: Tensor) -> Tensor:
        cells = []
        for r0, r1 in self.rows:
            for c0, c1 in self.cols:
                region = x[..., r0:r1, c0:c1]
                cells.append(region.mean((-2, -1)) if self.reduce == "mean" else region.amax((-2, -1)))
        return torch.stack(cells, -1).unflatten(-1, (len(self.rows), len(self.cols)))


def _pair(size: Any, default: tuple[int, int]) -> tuple[int, int]:
    """``output_size`` of an adaptive pool as two ints (None keeps that input dimension)."""
    size = (size, size) if size is None or isinstance(size, int) else tuple(size)
    return tuple(default[i] if s is None else int(s) for i, s in enumerate(size))


def fix_adaptive_pools(model: nn.Module, example: Tensor) -> int:
    """Replace (in place) 2-D adaptive pools whose output size does not divide their input size at
    ``example`` (or is given as None) by ``_FixedAdaptivePool2d``; returns how many were replaced.

    Only module pools are found (a functional ``F.adaptive_avg_pool2d`` call is left to the exporter).
    """
    kinds = {nn.AdaptiveAvgPool2d: "mean", nn.AdaptiveMaxPool2d: "max"}
    shapes: dict[str, set[tuple[int, int]]] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, set()).add(tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
             if type(m) in kinds and not getattr(m, "return_indices", False)]
    if not hooks:
        return 0
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    replaced = 0
    for name, seen in shapes.items():
        if len(seen) != 1:
            continue  # one module pooling inputs of several sizes: no single fixed form
        in_hw, pool = next(iter(seen)), model.get_submodule(name)
        out_hw = _pair(pool.output_size, in_hw)
        sizes = (pool.output_size,) * 2 if isinstance(pool.output_size, int) else tuple(pool.output_size)
        if None not in sizes and all(i % o == 0 for i, o in zip(in_hw, out_hw)):
            continue  # torch exports these itself (as a plain AveragePool/MaxPool)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                _FixedAdaptivePool2d(in_hw, out_hw, kinds[type(pool)]))
        replaced += 1
    return replaced


def trace_to_onnx(model: nn.Module, example: Tensor, opset: int, exporter: str | None = None) -> onnx.ModelProto:
    """Export ``model`` (a copy made for export) to an in-memory ModelProto at exactly ``opset``.

    The graph is captured by ``torch.export`` and translated by torch's ``torch.export``-based ONNX
    exporter (onnxscript) at opset ``TORCHLIB_OPSET``; ``onnx.version_converter`` then moves it to
    ``opset``. The batch dimension stays dynamic. Adaptive pools are first fixed to ``example``'s
    size (``fix_adaptive_pools``), which is what the graph is exported at anyway.

    A model that ``torch.export`` cannot capture (data-dependent Python control flow such as
    ``if x.sum() > 0``) or whose program torch cannot translate, and an explicit opset below 18,
    fall back to the TorchScript exporter, with a UserWarning that names the reason (that graph
    records the one path the example took). ``exporter="torchscript"`` asks for that exporter
    directly (no warning): 10-30x faster on small CNNs on a 2-core CPU, but deprecated by PyTorch.
    """
    exporter = DEFAULT_EXPORTER if exporter is None else exporter
    if exporter not in EXPORTERS:
        raise LowbitError(f"exporter must be one of {', '.join(map(repr, EXPORTERS))}, got {exporter!r}")
    try:
        with torch.no_grad():  # inside the try: a wrong example shape fails here first
            if example.dim() == 4:
                fix_adaptive_pools(model, example)
            else:
                model(example)
    except Exception as exc:  # the model's own error for this input
        raise LowbitError(f"could not trace the model with input {tuple(example.shape)}: {type(exc).__name__}: "
                          f"{str(exc)[:300]} (pass input_shape= if the shape is wrong)") from None
    if exporter == "torchscript":
        reason = None
    elif opset < TORCHLIB_OPSET:
        # onnx.version_converter has no downgrade adapters for common ops (Add 14 -> 13, ...)
        reason = f"torch's torch.export-based exporter writes opset {TORCHLIB_OPSET} or newer, not {opset}"
    else:
        try:
            return _dynamo_export(model, example, opset)
        except _ExportUnsupported as exc:
            reason = exc.reason
    model_proto = _torchscript_export(model, example, min(opset, TORCH_MAX_OPSET), reason)
    return _convert_opset(model_proto, opset)



class _ExportUnsupported(Exception):
    """torch.export (or its ONNX translation) cannot handle the model; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _short(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


@contextlib.contextmanager
def _no_stack_traces() -> Any:
    """torch.fx records and symbolizes a Python stack trace for every traced node (10-15% of an
    export's time); the ONNX graph does not keep them, so switch that off while tracing."""
    try:
        import torch.fx.config as fx_config
    except ImportError:  # pragma: no cover - another torch layout
        yield
        return
    before = getattr(fx_config, "do_not_emit_stack_traces", False)
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = before


def _dynamo_export(model: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    """``torch.export.export`` + ``torch.onnx.export(ExportedProgram)``; _ExportUnsupported on failure."""
    try:
        import onnxscript  # noqa: F401  (torch's new exporter is written with it)
    except ImportError:  # pragma: no cover
        raise LowbitError("lowbit ONNX export needs the 'onnxscript' and 'onnx-ir' packages "
                          "(pip install onnxscript onnx-ir)") from None
    _mark_schema()
    # an example batch of 1 would be specialized by torch.export (0/1 specialization); 2 keeps it symbolic
    batch = example if example.shape[0] > 1 else example.expand(2, *example.shape[1:]).contiguous()
    try:
        with _no_stack_traces():
            program = torch.export.export(model, (batch,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                                          strict=False)
    except Exception as exc:  # torch.export's many error types all mean "cannot capture this model"
        raise _ExportUnsupported(f"torch.export cannot capture it ({_short(exc)})") from None
    try:
        with warnings.catch_warnings():
            # torch 2.13's own run_decompositions deep-copies a pytree LeafSpec, whose deprecated
            # constructor warns (any torch.export user sees it; nothing lowbit or the model does)
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            with _no_stack_traces():
                onnx_program = _translate(program, batch)
    except Exception as exc:  # an aten op without an ONNX translation
        raise _ExportUnsupported(f"torch.onnx cannot translate its exported program ({_short(exc)})") from None
    model_proto = onnx_program.model_proto
    batch_dim = model_proto.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.dim_param:  # torch.export names it s<N>; call it "batch" as the TorchScript path did
        symbol = batch_dim.dim_param
        for value in list(model_proto.graph.input) + list(model_proto.graph.output):
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].dim_param == symbol:
                dims[0].dim_param = "batch"
    else:
        warnings.warn(f"lowbit ONNX export: the model's code fixes the batch size to {batch_dim.dim_value}; "
                      "the ONNX graph accepts only that batch size", UserWarning, stacklevel=5)
    return _convert_opset(model_proto, opset)


@functools.lru_cache(maxsize=1)
def _registry() -> Any:
    """torch's ONNX registry (torchlib at ``TORCHLIB_OPSET``) plus ``lowbit::mark``, built once.

    ``torch.onnx.export`` rebuilds it on every call, which re-parses the source of ~500 onnxscript
    functions (3 s of a 6-10 s ResNet-20 export on our 2-core machine). None when torch's
    internal exporter module is not where torch 2.13 keeps it; then the public API is used.
    """
    try:
        from torch.onnx._internal.exporter import _core, _registration  # noqa: F401
    except ImportError:  # pragma: no cover - another torch layout
        return None
    # without torchvision installed, torch logs one warning per torchvision op it skips
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        registry = _registration.ONNXRegistry.from_torchlib(opset_version=TORCHLIB_OPSET)
    finally:
        log.setLevel(level)
    registry.register_op(_MARK_OP, _mark_to_onnx)
    return registry


def _translate(program: torch.export.ExportedProgram, example: Tensor) -> Any:
    """torch's ``torch.export``-based ONNX exporter on ``program`` (an ``ONNXProgram`` at TORCHLIB_OPSET)."""
    registry = _registry()
    if registry is None:  # pragma: no cover - another torch layout
        return torch.onnx.export(program, (example,), dynamo=True, opset_version=TORCHLIB_OPSET,
                                 input_names=["input"], output_names=["logits"],
                                 custom_translation_table={_MARK_OP: _mark_to_onnx}, verbose=False)
    from torch.onnx._internal.exporter import _core

    return _core.export(program, registry=registry, input_names=["input"], output_names=["logits"],
                        verbose=False)


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` at ``opset`` (onnx.version_converter, up or down); LowbitError when an op has no adapter."""
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current == opset:
        return model
    from onnx import version_converter
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # converter failures name an op without an adapter
        raise LowbitError(f"could not convert the exported graph from opset {current} to opset {opset}: "
                          f"{str(exc)[:300]}") from None


def _torchscript_export(model: nn.Module, example: Tensor, opset: int, reason: str | None) -> onnx.ModelProto:
    """The TorchScript exporter (``dynamo=False``): for models torch.export cannot capture (``reason``
    says why), opsets below 18, or when asked for (``reason`` None).

    Its own DeprecationWarnings (the exporter itself is deprecated) are dropped: the warning
    emitted here says that this path is taken and why, and asking for it is a choice. Tracer
    warnings are repeated in that warning (or as one of their own when the exporter was asked for).
    """
    for module in model.modules():
        if isinstance(module, _Marker):
            module.legacy = True
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True)
    except Exception as exc:  # the exporter raises many types; all mean "this model cannot be traced"
        raise LowbitError(f"torch.onnx.export could not trace the model with input {tuple(example.shape)}: "
                          f"{reason}; TorchScript exporter: {type(exc).__name__}: {str(exc)[:300]}") from None
    finally:
        for module in model.modules():
            if isinstance(module, _Marker):
                module.legacy = False
    traced = list(dict.fromkeys(str(w.message).splitlines()[0][:200] for w in caught
                                if issubclass(w.category, torch.jit.TracerWarning)))
    for w in caught:  # everything but the exporter's own deprecation notices and the tracer warnings goes on
        legacy_notice = issubclass(w.category, DeprecationWarning) and (
            "legacy TorchScript" in str(w.message) or "torchscript_exporter" in w.filename.replace(os.sep, "/"))
        if not legacy_notice and not issubclass(w.category, torch.jit.TracerWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    detail = f" (tracer: {traced[0]})" if traced else ""
    if reason is not None:
        warnings.warn(f"lowbit ONNX export: {reason}; exported with the TorchScript exporter instead, so the "
                      f"traced graph may only be valid for inputs like the example{detail}", UserWarning, stacklevel=4)
    elif traced:
        warnings.warn(f"lowbit ONNX export: the traced graph may only be valid for inputs like the example{detail}",
                      UserWarning, stacklevel=4)
    return onnx.load_from_string(buffer.getvalue())


# --------------------------------------------------------------------------------------- rewrite
def _scalar_initializer(name: str, value: float | int, dtype: int) -> TensorProto:
    if dtype == TensorProto.FLOAT:
        return numpy_helper.from_array(np.array(value, dtype=np.float32), name)
    return int_initializer(name, np.array(value), dtype)


def _rewrite_markers(model: onnx.ModelProto, weights: dict[str, WeightSpec], inputs: dict[str, InputSpec],
                     int32_bias: bool = False) -> dict[str, Any]:
    """Replace every ``lowbit::Mark`` node by DQ (weights) or [Clip] Q DQ (inputs); returns layer metadata."""
    graph = model.graph
    new_nodes: list[onnx.NodeProto] = []
    added: dict[str, TensorProto] = {}
    seen: Counter = Counter()
    layers_meta: dict[str, dict] = {}
    weight_outputs: dict[str, str] = {}
    renamed: dict[str, str] = {}  # marker output -> short readable value name

    def add(tensor: TensorProto) -> str:
        added.setdefault(tensor.name, tensor)
        return tensor.name

    for node in graph.node:
        if node.domain != MARK_DOMAIN:
            new_nodes.append(node)
            continue
        tag = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "tag")
        tag = tag.decode() if isinstance(tag, bytes) else tag
        kind, name = tag.split(":", 1)
        seen[tag] += 1
        suffix = "" if seen[tag] == 1 else f"#{seen[tag]}"
        out = renamed[node.output[0]] = f"{name}.{'weight' if kind == 'w' else 'input'}_dq{suffix}"
        if kind == "w":
            spec = weights[name]
            offset = 0
            if saturates_u8s8(spec, inputs.get(name)):
                spec, offset = as_unsigned_weight(spec), 128
            codes = add(int_initializer(f"{name}.weight_q", spec.codes, spec.dtype))
            scale = add(numpy_helper.from_array(spec.scale if len(spec.scale) > 1 else spec.scale.reshape(()),
                                                f"{name}.weight_scale"))
            zp_values = spec.zero_point if len(spec.zero_point) > 1 else spec.zero_point.reshape(())
            zero = add(int_initializer(f"{name}.weight_zero_point", zp_values, spec.dtype))
            attrs = {"axis": spec.axis} if len(spec.scale) > 1 else {}
            dq_out = out
            if spec.dtype in _GUARDED_TYPES:
                dq_out = f"{name}.weight_dq_unshaped{suffix}"
            new_nodes.append(helper.make_node("DequantizeLinear", [codes, scale, zero], [dq_out],
                                              name=f"{name}.weight_dq{suffix}", **attrs))
            if dq_out != out:
                shape = add(numpy_helper.from_array(np.array(spec.codes.shape[:-1], dtype=np.int64),
                                                    f"{name}.weight_shape"))
                new_nodes.append(helper.make_node("Reshape", [dq_out, shape], [out],
                                                  name=f"{name}.weight_reshape{suffix}"))
            # "signed" is the codes' own signedness; "offset" says they are stored shifted into UINT8
            layers_meta.setdefault(name, {})["weight"] = {"bits": spec.bits, "type": _type_name(spec.dtype),
                                                          "signed": spec.signed or bool(offset), "offset": offset,
                                                          "channels_scaled": len(spec.scale)}
            weight_outputs[out] = name
        else:
            spec = inputs[name]
            dtype, clip = activation_type(spec.bits, spec.signed)
            scale = add(_scalar_initializer(f"{name}.input_scale", spec.scale, TensorProto.FLOAT))
            zero = add(_scalar_initializer(f"{name}.input_zero_point", spec.zero_point, dtype))
            src = node.input[0]
            if clip:
                # codes narrower than the container: clamp in float to the code range, which is the
                # simulation's clamp after rounding (rounding is monotone), so the codes match exactly
                lo = add(_scalar_initializer(f"{name}.input_clip_min", np.float32((spec.qmin - spec.zero_point)
                                                                                   * np.float32(spec.scale)),
                                             TensorProto.FLOAT))
                hi = add(_scalar_initializer(f"{name}.input_clip_max", np.float32((spec.qmax - spec.zero_point)
                                                                                   * np.float32(spec.scale)),
                                             TensorProto.FLOAT))
                clipped = f"{name}.input_clipped{suffix}"
                new_nodes.append(helper.make_node("Clip", [src, lo, hi], [clipped], name=f"{name}.input_clip{suffix}"))
                src = clipped
            q = f"{name}.input_q{suffix}"
            new_nodes.append(helper.make_node("QuantizeLinear", [src, scale, zero], [q], name=f"{name}.input_q{suffix}"))
            new_nodes.append(helper.make_node("DequantizeLinear", [q, scale, zero], [out],
                                              name=f"{name}.input_dq{suffix}"))
            layers_meta.setdefault(name, {})["input"] = {"bits": spec.bits, "type": _type_name(dtype),
                                                         "signed": spec.signed, "clipped": clip}
    missing = sorted(({f"w:{n}" for n in weights} | {f"in:{n}" for n in inputs}) - set(seen))
    if missing:
        raise LowbitError(f"quantizers not reached by the exported graph: {missing[:5]} (a layer whose forward "
                          "does not call its quantizers cannot be exported)")
    for node in new_nodes:
        for i, value in enumerate(node.input):
            if value in renamed:
                node.input[i] = renamed[value]
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(added.values())
    _place_biases(graph, weight_outputs, weights, inputs, int32_bias)
    return layers_meta


def _place_biases(graph: onnx.GraphProto, weight_outputs: dict[str, str], weights: dict[str, WeightSpec],
                  inputs: dict[str, InputSpec], int32_bias: bool) -> None:
    """Give the float bias of every Conv/ConvTranspose/Gemm with a quantized input its final form.

    Default: keep it exactly. ONNX Runtime's WeightBiasQuantization would round a float bias
    initializer of a Conv/Gemm fed by DequantizeLinear to int32 at ``s_x * s_w``, which the
    simulation does not do (at 4 bit that alone moved top-1 by over a point), so the bias is
    added after the Conv instead (Gemm gets it as a 1 x N tensor, which is never quantized).
    With ``int32_bias`` the bias is written as ``DequantizeLinear(int32, s_x * s_w)``, a device's
    int32 bias, which lets ONNX Runtime fuse 8-bit layers into QLinearConv.
    """
    inits = {t.name for t in graph.initializer}
    constants = constant_values(graph)
    new_nodes = []
    for index, node in enumerate(graph.node):
        name = weight_outputs.get(node.input[1]) if len(node.input) > 1 else None
        if (name is None or name not in inputs or node.op_type not in ("Conv", "ConvTranspose", "Gemm")
                or len(node.input) < 3 or node.input[2] not in constants):
            new_nodes.append(node)
            continue
        bias = constants[node.input[2]].astype(np.float32).reshape(-1)
        if int32_bias and not weights[name].custom_forward:  # (as in with_int32_bias and the integer path)
            w_scale = weights[name].out_scale  # per output channel (ConvTranspose: tiled over its groups)
            step = (np.float32(inputs[name].scale) * w_scale).astype(np.float32)
            codes = np.round(bias.astype(np.float64) / step.astype(np.float64))
            if np.abs(codes).max(initial=0) >= 2 ** 31:
                raise LowbitError(f"layer {name}: the bias does not fit int32 at scale s_x * s_w")
            if f"{name}.bias_q" not in inits:
                inits |= {f"{name}.bias_q", f"{name}.bias_scale"}
                graph.initializer.extend([int_initializer(f"{name}.bias_q", codes, TensorProto.INT32),
                                          numpy_helper.from_array(step if len(step) > 1 else step.reshape(()),
                                                                  f"{name}.bias_scale")])
            attrs = {"axis": 0} if len(step) > 1 else {}
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}.bias_q", f"{name}.bias_scale"],
                                              [f"{name}.bias_dq#{index}"], name=f"{name}.bias_dq#{index}", **attrs))
            node.input[2] = f"{name}.bias_dq#{index}"
            new_nodes.append(node)
            continue
        ndim = 2 if node.op_type == "Gemm" else weights[name].ndim  # a conv's output has its weight's rank
        shaped = f"{name}.bias_2d" if ndim == 2 else f"{name}.bias_nchw" if ndim == 4 else f"{name}.bias_{ndim}d"
        if shaped not in inits:
            inits.add(shaped)
            graph.initializer.append(numpy_helper.from_array(bias.reshape((1, -1) + (1,) * (ndim - 2)), shaped))
        if node.op_type == "Gemm":
            node.input[2] = shaped
            new_nodes.append(node)
            continue
        out = node.output[0]
        node.output[0] = f"{name}.conv_out#{index}"
        del node.input[2]
        new_nodes.append(node)
        new_nodes.append(helper.make_node("Add", [node.output[0], shaped], [out], name=f"{name}.bias_add#{index}"))
    del graph.node[:]
    graph.node.extend(new_nodes)


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of initializers and of Constant / Identity-of-constant outputs (the exporter shares
    equal initializers through Identity nodes, which ONNX Runtime folds back into initializers)."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing uses, then unused initializers (the markers' float weights)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | outputs
    keep_init = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_init)
    del graph.value_info[:]  # stale shapes of removed marker outputs; checker re-infers


def build_onnx(qmodel: nn.Module, opset: int | None = None, input_shape: Sequence[int] | None = None,
               int32_bias: bool = False, exporter: str | None = None, drop_pruned: bool = True) -> onnx.ModelProto:
    """The QDQ ModelProto of a quantized model (checked, not written); see ``export_onnx``."""
    info = require_quantized(qmodel)
    weights, inputs = collect_specs(qmodel)
    if opset is None:
        opset = default_opset(weights, inputs)
    check_opset(opset, weights, inputs)
    example = example_input(qmodel, input_shape)
    model = trace_to_onnx(_marked_copy(qmodel, weights, inputs), example, opset, exporter)
    layers_meta = _rewrite_markers(model, weights, inputs, bool(int32_bias))
    if drop_pruned:
        from .onnx_prune import drop_pruned_channels  # (it builds on this module's helpers)

        for name, row in drop_pruned_channels(model.graph, weights).items():
            layers_meta[name]["weight"]["pruned_channels"] = row
    _prune(model.graph)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", opset)])
    model.producer_name = "lowbit"
    from .. import __version__
    model.producer_version = __version__
    meta = {"arch": info.get("arch"), "method": info.get("method"), "config": info.get("config"),
            "bias": "int32" if int32_bias else "float", "layers": layers_meta}
    helper.set_model_props(model, {"lowbit": json.dumps(meta)})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise LowbitError(f"the exported ONNX graph does not pass onnx.checker: {str(exc)[:500]}") from None
    return model


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, opset: int | None = None,
                input_shape: Sequence[int] | None = None, int32_bias: bool = False,
                exporter: str | None = None, drop_pruned: bool = True) -> Path:
    """Write the QDQ ONNX graph of a quantized model, atomically.

    Args:
        qmodel: a model returned by ``lowbit.quantize`` (or ``lowbit.load``).
        path: destination file (any suffix; ``lowbit.export`` sends ``*.onnx`` here).
        opset: ONNX opset; default the lowest from 18 on that stores every weight at its width
            (18 for 5..8 bit, 21 for 3..4 and 9..16 bit, 25 for 1..2 bit); one too old for the
            weights raises LowbitError; 13..17 are written by the TorchScript exporter (a warning).
        input_shape: ``(C, H, W)`` or ``(N, C, H, W)`` used for export (batch stays dynamic);
            default the recorded calibration shape, else the first layer's channels at 28x28.
        int32_bias: write biases as int32 at ``s_x * s_w`` (what an integer device stores; ONNX
            Runtime then runs 8-bit layers as QLinearConv). The graph then matches
            ``lowbit.deploy.integer.with_int32_bias(qmodel)`` rather than ``qmodel``. Default:
            biases stay float and ONNX Runtime reproduces the simulation.
        exporter: ``"torch.export"`` (the default, None): PyTorch's ``torch.export``-based ONNX exporter,
            with the TorchScript exporter as a fallback for models it cannot capture;
            ``"torchscript"``: PyTorch's deprecated TorchScript exporter (10-30x faster on
            small CNNs; records one path through data-dependent control flow).
        drop_pruned: remove pruned (0-bit) output channels from the weights and the graph where
            that is exact (``deploy.onnx_prune``); False keeps every pruned channel as zero codes.

    Returns:
        ``path`` as a Path.
    """
    model = build_onnx(qmodel, opset, input_shape, int32_bias, exporter, drop_pruned)
    path = Path(path)
    atomic_write(path, lambda tmp: onnx.save_model(model, tmp))
    return path


def export_float_onnx(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int] = (1, 28, 28),
                      opset: int = TORCHLIB_OPSET) -> Path:
    """Write an FP32 ONNX graph of any (unquantized) model, e.g. the baseline of a latency benchmark."""
    example = torch.zeros((1,) + tuple(input_shape) if len(input_shape) == 3 else tuple(input_shape))
    onnx_model = trace_to_onnx(copy.deepcopy(model).cpu().eval(), example, opset)
    path = Path(path)
    atomic_write(path, lambda tmp: onnx.save_model(onnx_model, tmp))
    return path


# ------------------------------------------------------------------------------ running in ORT
def onnx_session(path: str | os.PathLike | bytes, threads: int = 1, optimize: bool = True,
                 fold_weights: bool = False) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads.

    ``fold_weights`` sets ``session.disable_quant_qdq``: ONNX Runtime then dequantizes the integer
    weights once at load time (constant folding) instead of on every run, and runs float kernels
    with pre-packed weights; activations still go through their Q/DQ, so results do not change.
    """
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        raise LowbitError("running ONNX models needs the 'onnxruntime' package") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if fold_weights:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    source = path if isinstance(path, bytes) else str(path)
    if not isinstance(path, bytes) and not Path(path).is_file():
        raise LowbitError(f"no ONNX file at {path}")
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception classes
        raise LowbitError(f"ONNX Runtime cannot load {path if not isinstance(path, bytes) else 'the model'}: "
                          f"{str(exc)[:300]}") from None


def onnx_predict(session_or_path: Any, images: Tensor, batch_size: int = 500, threads: int = 1) -> Tensor:
    """Logits of an ONNX model (path or session) on ``images``, in batches."""
    session = session_or_path if hasattr(session_or_path, "run") else onnx_session(session_or_path, threads)
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: images[i:i + batch_size].float().cpu().numpy()})[0]
            for i in range(0, len(images), batch_size)]
    return torch.from_numpy(np.concatenate(outs))


def onnx_accuracy(session_or_path: Any, images: Tensor, labels: Tensor, batch_size: int = 500,
                  threads: int = 1) -> tuple[float, float]:
    """``(top-1 %, seconds)`` of an ONNX model in ONNX Runtime (session creation included)."""
    start = time.perf_counter()
    logits = onnx_predict(session_or_path, images, batch_size, threads)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item(), time.perf_counter() - start


@torch.no_grad()
def onnx_parity(qmodel: nn.Module, session_or_path: Any, images: Tensor, labels: Tensor | None = None,
                batch_size: int = 500) -> dict[str, float]:
    """ONNX Runtime versus the PyTorch simulation on the same images.

    Returns:
        ``max_abs_diff`` and ``mean_abs_diff`` of the logits, ``argmax_agreement`` (% of images
        whose predicted class matches) and, with ``labels``, both top-1 accuracies (%).
    """
    from ..evaluate import predict

    device = next(qmodel.parameters()).device
    sim = predict(qmodel, images, batch_size, device)
    ort_logits = onnx_predict(session_or_path, images, batch_size)
    diff = (sim - ort_logits).abs()
    result = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
              "argmax_agreement": 100.0 * (sim.argmax(1) == ort_logits.argmax(1)).float().mean().item()}
    if labels is not None:
        result["sim_top1"] = 100.0 * (sim.argmax(1) == labels).float().mean().item()
        result["onnx_top1"] = 100.0 * (ort_logits.argmax(1) == labels).float().mean().item()
    return result


def onnx_weight_report(path: str | os.PathLike | onnx.ModelProto) -> list[dict[str, Any]]:
    """Every DequantizeLinear weight initializer: name, ONNX type, shape, min and max code.

    ``offset`` is 128 for symmetric 8-bit codes stored shifted in UINT8 (``as_unsigned_weight``);
    ``min``/``max`` are the codes before that shift.
    """
    model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[0].endswith(".weight_q"):
            dtype = inits[node.input[0]].data_type
            values = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
            offset = 0
            if dtype == TensorProto.UINT8 and len(node.input) > 2 and node.input[2] in inits:
                zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64)
                offset = 128 if (zero == 128).all() else 0  # symmetric codes shifted by as_unsigned_weight
            rows.append({"name": node.input[0], "type": _type_name(dtype), "offset": offset,
                         "shape": list(values.shape), "min": int(values.min()) - offset,
                         "max": int(values.max()) - offset})
    return rows
