"""Model size accounting: FP32 versus weights at their bit width plus scales (seed 002 "Size (MB)")."""
from __future__ import annotations

from torch import nn

from ..quant.layers import quant_layers

MB = 1024 * 1024


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers stored as float32 (integers at their own size)."""
    state = model.state_dict()
    return sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in state.values())


def quantized_bytes(qmodel: nn.Module) -> int:
    """Theoretical size: quantized weights at their bit width, their scales (and zero points when
    asymmetric) at 32 bit, enabled input quantizers' scale and zero point, and every other
    parameter/buffer (biases, unfolded BN) at 32 bit, integers at their own size.

    This is exactly the tensor data ``lowbit.export`` writes to a ``.lowbit`` file; the file adds
    only its safetensors header and JSON manifest.
    """
    state = qmodel.state_dict()
    total = 0
    counted: set[str] = set()
    for name, layer in quant_layers(qmodel):
        wq = layer.weight_quant
        if wq.enabled:
            total += (layer.weight.numel() * wq.bits + 7) // 8
            total += wq.num_groups * 4 * (1 if wq.symmetric else 2)
            counted.update({f"{name}.weight", f"{name}.weight_quant.scale", f"{name}.weight_quant.zero_point"})
        if layer.input_quant.enabled:
            total += 8
        counted.update({f"{name}.input_quant.scale", f"{name}.input_quant.zero_point"})
        if not wq.enabled:
            counted.update({f"{name}.weight_quant.scale", f"{name}.weight_quant.zero_point"})
    for key, value in state.items():
        if key not in counted:
            total += value.numel() * (4 if value.is_floating_point() else value.element_size())
    return total


def size_report(fp_model: nn.Module, qmodel: nn.Module) -> dict[str, float]:
    """FP32 and theoretical quantized sizes in MB, and their ratio."""
    fp, q = fp32_bytes(fp_model), quantized_bytes(qmodel)
    return {"fp32_mb": fp / MB, "quantized_mb": q / MB, "compression": fp / max(q, 1)}
