"""Conv and linear layers that simulate quantized weights and quantized inputs."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .quantizer import ActQuantizer, WeightQuantizer


class _Quantized:
    """Attaches the two quantizers and the protocol role (first / last / body) to a layer."""

    def __init__(self, *args, weight_quant: WeightQuantizer, input_quant: ActQuantizer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.role = "body"


class QuantConv2d(_Quantized, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight pass through quantizers (names and params unchanged)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quant: WeightQuantizer, input_quant: ActQuantizer) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                weight_quant=weight_quant, input_quant=input_quant,
                device="meta", dtype=conv.weight.dtype)  # meta: no throwaway init, no RNG draw
        q.weight = conv.weight
        q.bias = conv.bias
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quant(x), self.weight_quant(self.weight), self.bias)


class QuantLinear(_Quantized, nn.Linear):
    """``nn.Linear`` whose input and weight pass through quantizers."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quant: WeightQuantizer, input_quant: ActQuantizer) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                weight_quant=weight_quant, input_quant=input_quant,
                device="meta", dtype=linear.weight.dtype)
        q.weight = linear.weight
        q.bias = linear.bias
        return q

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self.input_quant(x), self.weight_quant(self.weight), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)
FLOAT_LAYERS = (nn.Conv2d, nn.Linear)


def quant_layers(model: nn.Module) -> list[tuple[str, QuantConv2d | QuantLinear]]:
    """``(name, layer)`` of every quantized layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


@torch.no_grad()
def bake_weights(model: nn.Module) -> None:
    """Replace each layer's FP weight by its quantized value, so export sees exact integers."""
    for _, layer in quant_layers(model):
        if layer.weight_quant.enabled:
            layer.weight.copy_(layer.weight_quant(layer.weight))
