"""Model size accounting: FP32 versus weights at their bit width plus scales (seed 002 "Size (MB)")."""
from __future__ import annotations

from torch import nn

from ..quant.layers import float_weight_layers, quant_layers

MB = 1024 * 1024


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers stored as float32 (integers at their own size)."""
    state = model.state_dict()
    return sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in state.values())


def layer_weight_bytes(layer: nn.Module) -> int:
    """Bytes of one quantized layer's weight as stored: codes at their bit width (byte-aligned per
    layer) plus their scales (and zero points when asymmetric) at 32 bit; float32 when its weight
    quantizer is off."""
    wq = layer.weight_quant
    if not wq.enabled:
        return layer.weight.numel() * 4
    channel_bits = getattr(wq, "channel_bits", None)
    if channel_bits is not None:  # multi-bit (DMBQ): bits_c sign planes per channel plus bits_c float32 alphas;
        per_channel = layer.weight.numel() // wq.channels  # a pruned channel (0 bits) costs nothing
        total = int(channel_bits.sum())
        return (per_channel * total + 7) // 8 + 4 * total
    return (layer.weight.numel() * wq.bits + 7) // 8 + wq.num_groups * 4 * (1 if wq.symmetric else 2)


def input_quant_bytes(aq: nn.Module) -> int:
    """Stored parameters of an enabled input quantizer: scale and zero point, or its alphas (DMBQ)."""
    alpha = getattr(aq, "alpha", None)
    return 4 * alpha.numel() if alpha is not None else 8


def quantized_bytes(qmodel: nn.Module) -> int:
    """Theoretical size: quantized weights at their bit width, their scales (and zero points when
    asymmetric) at 32 bit, enabled input quantizers' scale and zero point, and every other
    parameter/buffer (biases, unfolded BN, weights of layers left in float) at 32 bit, integers
    at their own size.

    This is exactly the tensor data ``lowbit.export`` writes to a ``.lowbit`` file; the file adds
    only its safetensors header and JSON manifest.
    """
    state = qmodel.state_dict()
    total = 0
    counted: set[str] = set()
    for name, layer in quant_layers(qmodel):
        wq = layer.weight_quant
        if wq.enabled:
            total += layer_weight_bytes(layer)
            counted.add(f"{name}.weight")
        if layer.input_quant.enabled:
            total += input_quant_bytes(layer.input_quant)
        # the quantizers' own tensors (scales, zero points; DMBQ alphas and per-channel bits) are
        # what the lines above count, or nothing when the quantizer is off
        counted.update(k for k in state if k.startswith((f"{name}.weight_quant.", f"{name}.input_quant.")))
    for key, value in state.items():
        if key not in counted:
            total += value.numel() * (4 if value.is_floating_point() else value.element_size())
    return total


def own_weight_elements(module: nn.Module) -> int:
    """Weight elements (parameters of 2+ dims) of a layer lowbit does not quantize, its sub-layers excluded
    (they are counted on their own)."""
    own = [p for n, p in module.named_parameters() if "." not in n or n.startswith("parametrizations.")]
    return sum(p.numel() for p in own if p.dim() >= 2)


def weight_counts(qmodel: nn.Module) -> dict[str, int | list[str]]:
    """How many weight elements are stored at their bit width and how many stay float32.

    Float: weights of quantized layers whose weight quantizer is off (never called, or weights
    left unquantized) and the weight tensors (2+ dims) of layers lowbit does not quantize
    (Conv3d, ConvTranspose1d/3d, Embedding, ...), which ``float_layers`` names.
    """
    quantized = floating = 0
    for _, layer in quant_layers(qmodel):
        if layer.weight_quant.enabled:
            quantized += layer.weight.numel()
        else:
            floating += layer.weight.numel()
    others = float_weight_layers(qmodel)
    for _, module in others:
        floating += own_weight_elements(module)
    return {"quantized_weights": quantized, "float_weights": floating, "float_layers": [n for n, _ in others]}


def size_report(fp_model: nn.Module, qmodel: nn.Module) -> dict[str, float | int | list[str]]:
    """FP32 and theoretical quantized sizes in MB, their ratio, and the weight counts of
    ``weight_counts`` (layers left in float are counted at 32 bit in ``quantized_mb``)."""
    fp, q = fp32_bytes(fp_model), quantized_bytes(qmodel)
    return {"fp32_mb": fp / MB, "quantized_mb": q / MB, "compression": fp / max(q, 1), **weight_counts(qmodel)}
