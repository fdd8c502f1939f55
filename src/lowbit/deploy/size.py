"""Model size accounting: FP32 versus weights at their bit width plus scales (seed 002 "Size (MB)").

Quantized tensors are counted from their declared specs (``quant.layer_specs``), never from the
quantizer modules: what a spec says is stored is what the size is.
"""
from __future__ import annotations

import math

from torch import nn

from ..quant import spec as qspec
from ..quant.layer_specs import layer_specs
from ..quant.layers import float_weight_layers
from ..quant.spec import LayerSpec

MB = 1024 * 1024


def _stored(numel: int, is_float: bool, element_size: int) -> int:
    """Bytes of a plain tensor: float32 for floating point, integers at their own size."""
    return numel * (4 if is_float else element_size)


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers stored as float32 (integers at their own size)."""
    state = model.state_dict()
    return sum(_stored(v.numel(), v.is_floating_point(), v.element_size()) for v in state.values())


def layer_weight_bytes(spec: LayerSpec) -> int:
    """Bytes of one quantized layer's weight as stored: codes at their bit width (byte-aligned per
    layer) plus their parameters at 32 bit (``quant.spec.nbytes``); float32 when the weight stays float."""
    numel = math.prod(spec.weight_shape)
    return numel * 4 if spec.weight is None else qspec.nbytes(spec.weight, numel)


def quantized_bytes(qmodel: nn.Module, specs: list[LayerSpec] | None = None) -> int:
    """Theoretical size: quantized weights at their bit width, their scales (and zero points when
    asymmetric) at 32 bit, quantized inputs' parameters (scale and zero point, a sparse input's
    threshold, multi-bit alphas), and every other parameter/buffer (biases,
    unfolded BN, weights of layers left in float) at 32 bit, integers at their own size.

    ``specs``: the model's ``layer_specs`` when the caller has them already. A model whose
    quantizers declare no spec (mid-QAT stand-ins) is a LowbitError. This is exactly the tensor
    data ``lowbit.export`` writes to a ``.lowbit`` file; the file adds only its safetensors header
    and JSON manifest.
    """
    specs = layer_specs(qmodel) if specs is None else specs
    state = qmodel.state_dict()
    total = 0
    counted: set[str] = set()
    for s in specs:
        if s.weight is not None:
            total += layer_weight_bytes(s)
            counted.add(f"{s.name}.weight")
        if s.input is not None:
            total += qspec.nbytes(s.input, 0)  # scale and zero point (+ sparse threshold) or alphas
        # the quantizers' own tensors (scales, zero points; DMBQ alphas and per-channel bits) are
        # what the lines above count, or nothing when the tensor stays float
        counted.update(k for k in state if k.startswith((f"{s.name}.weight_quant.", f"{s.name}.input_quant.")))
    return total + sum(_stored(v.numel(), v.is_floating_point(), v.element_size())
                       for k, v in state.items() if k not in counted)


def own_weight_elements(module: nn.Module) -> int:
    """Weight elements (parameters of 2+ dims) of a layer lowbit does not quantize, its sub-layers excluded
    (they are counted on their own)."""
    own = [p for n, p in module.named_parameters() if "." not in n or n.startswith("parametrizations.")]
    return sum(p.numel() for p in own if p.dim() >= 2)


def weight_counts(qmodel: nn.Module, specs: list[LayerSpec] | None = None) -> dict[str, int | list[str]]:
    """How many weight elements are stored at their bit width and how many stay float32.

    Float: weights of quantized layers whose weight spec is float (never called, or weights left
    unquantized) and the weight tensors (2+ dims) of layers lowbit does not quantize (Conv3d,
    ConvTranspose1d/3d, Embedding, ...), which ``float_layers`` names.
    """
    quantized = floating = 0
    for s in layer_specs(qmodel) if specs is None else specs:
        if s.weight is not None:
            quantized += math.prod(s.weight_shape)
        else:
            floating += math.prod(s.weight_shape)
    others = float_weight_layers(qmodel)
    for _, module in others:
        floating += own_weight_elements(module)
    return {"quantized_weights": quantized, "float_weights": floating, "float_layers": [n for n, _ in others]}


def size_report(fp_model: nn.Module, qmodel: nn.Module) -> dict[str, float | int | list[str]]:
    """FP32 and theoretical quantized sizes in MB, their ratio, and the weight counts of
    ``weight_counts`` (layers left in float are counted at 32 bit in ``quantized_mb``)."""
    specs = layer_specs(qmodel)
    fp, q = fp32_bytes(fp_model), quantized_bytes(qmodel, specs)
    return {"fp32_mb": fp / MB, "quantized_mb": q / MB, "compression": fp / max(q, 1), **weight_counts(qmodel, specs)}
