"""Layers that simulate quantized weights and quantized inputs, and the layer kinds lowbit handles.

Kinds: ``Conv1d``, ``Conv2d``, ``ConvTranspose2d`` and ``Linear`` (``LAYER_KINDS``). A layer of
one of these classes, or of a subclass that only renames it (no method of the forward path
overridden), is replaced by its quantized twin (``QuantConv2d``, ...), with the same parameters.

A subclass with its own ``forward`` keeps it: its class becomes a generated subclass
(``quantized_subclass``) whose forward quantizes the first input, puts the quantized weight in
place of ``weight`` for the duration of the call, and runs the subclass's own forward. Whatever
that forward does (flip the kernel, add a constant, call ``super().forward``) then happens on
the quantized weight and input.

Weight layers of any other kind (Conv3d, ConvTranspose1d/3d, Embedding, RNNs, ...) stay in
float; ``float_weight_layers`` names them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .quantizer import ActQuantizer, WeightQuantizer


class QuantLayer:
    """Mixin of every quantized layer: the two quantizers and the protocol role (first / last / body).

    Class attributes: ``kind`` (a ``LAYER_KINDS`` key) and ``custom_forward`` (True for
    generated subclasses that run a user's own forward).
    """

    kind: str = ""
    custom_forward: bool = False
    weight_quant: nn.Module
    input_quant: nn.Module
    role: str

    def _attach(self, weight_quant: WeightQuantizer, input_quant: ActQuantizer) -> None:
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.role = "body"


class _Quantized(QuantLayer):
    """Constructor support for the built-in quantized layers (``cls(*args, weight_quant=, input_quant=)``)."""

    def __init__(self, *args, weight_quant: WeightQuantizer, input_quant: ActQuantizer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._attach(weight_quant, input_quant)


def _take_params(q: nn.Module, layer: nn.Module) -> nn.Module:
    q.weight = layer.weight
    q.bias = layer.bias
    return q


class _QuantConvNd(_Quantized):
    """Construction and forward shared by the direct convolutions (Conv1d, Conv2d)."""

    @classmethod
    def from_float(cls, conv: nn.Module, weight_quant: WeightQuantizer, input_quant: ActQuantizer) -> nn.Module:
        return _take_params(cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                                weight_quant=weight_quant, input_quant=input_quant,
                                device="meta", dtype=conv.weight.dtype), conv)  # meta: no throwaway init, no RNG

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quant(x), self.weight_quant(self.weight), self.bias)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """``nn.Conv1d`` whose input and weight pass through quantizers (names and params unchanged)."""

    kind = "conv1d"


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight pass through quantizers (names and params unchanged)."""

    kind = "conv2d"


class QuantConvTranspose2d(_Quantized, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose input and weight pass through quantizers.

    The weight is ``(in, out / groups, kH, kW)``; its per-channel scales run along dim 1, the
    output channels (shared by the conv groups when ``groups > 1``), as PyTorch and ONNX do.
    """

    kind = "convtranspose2d"

    @classmethod
    def from_float(cls, conv: nn.ConvTranspose2d, weight_quant: WeightQuantizer,
                   input_quant: ActQuantizer) -> "QuantConvTranspose2d":
        return _take_params(cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                conv.output_padding, conv.groups, conv.bias is not None, conv.dilation,
                                conv.padding_mode, weight_quant=weight_quant, input_quant=input_quant,
                                device="meta", dtype=conv.weight.dtype), conv)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(x, output_size, self.stride, self.padding,  # type: ignore[arg-type]
                                              self.kernel_size, 2, self.dilation)  # type: ignore[arg-type]
        return F.conv_transpose2d(self.input_quant(x), self.weight_quant(self.weight), self.bias, self.stride,
                                  self.padding, output_padding, self.groups, self.dilation)


class QuantLinear(_Quantized, nn.Linear):
    """``nn.Linear`` whose input and weight pass through quantizers."""

    kind = "linear"

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quant: WeightQuantizer, input_quant: ActQuantizer) -> "QuantLinear":
        return _take_params(cls(linear.in_features, linear.out_features, linear.bias is not None,
                                weight_quant=weight_quant, input_quant=input_quant,
                                device="meta", dtype=linear.weight.dtype), linear)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self.input_quant(x), self.weight_quant(self.weight), self.bias)


@dataclass(frozen=True)
class LayerKind:
    """A float layer class lowbit quantizes.

    Attributes:
        name: short name (``"conv2d"``), stored in artifacts.
        float_type: the torch class.
        quant_type: its quantized twin.
        axis: weight dimension of the output channels (per-channel scales run along it).
        spatial: number of spatial dimensions of the input (0 for Linear).
        transposed: a transposed convolution.
        forward_path: methods whose override makes a subclass "custom" (it then keeps its forward).
    """

    name: str
    float_type: type
    quant_type: type
    axis: int
    spatial: int
    transposed: bool
    forward_path: tuple[str, ...]


LAYER_KINDS: dict[str, LayerKind] = {k.name: k for k in (
    LayerKind("conv1d", nn.Conv1d, QuantConv1d, 0, 1, False, ("forward", "_conv_forward")),
    LayerKind("conv2d", nn.Conv2d, QuantConv2d, 0, 2, False, ("forward", "_conv_forward")),
    LayerKind("convtranspose2d", nn.ConvTranspose2d, QuantConvTranspose2d, 1, 2, True,
              ("forward", "_output_padding")),
    LayerKind("linear", nn.Linear, QuantLinear, 0, 0, False, ("forward",)),
)}

QUANT_LAYERS = (QuantLayer,)  # every quantized layer, built-in or generated (isinstance checks)
FLOAT_LAYERS = tuple(k.float_type for k in LAYER_KINDS.values())


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a float or quantized layer, None for modules lowbit does not quantize."""
    if isinstance(module, QuantLayer):
        return LAYER_KINDS[module.kind]
    for kind in LAYER_KINDS.values():
        if isinstance(module, kind.float_type):
            return kind
    return None


def has_custom_forward(module: nn.Module) -> bool:
    """Whether ``module`` is a subclass of a lowbit kind that overrides a method of its forward path."""
    if isinstance(module, QuantLayer):
        return module.custom_forward
    kind = layer_kind(module)
    if kind is None or type(module) is kind.float_type:
        return False
    return any(getattr(type(module), m, None) is not getattr(kind.float_type, m) for m in kind.forward_path)


def is_plain_layer(module: nn.Module) -> bool:
    """A float layer of a lowbit kind whose forward is the kind's own (the class or a rename of it)."""
    return (not isinstance(module, QuantLayer) and layer_kind(module) is not None
            and not has_custom_forward(module) and not _parametrized(module))


def _parametrized(module: nn.Module) -> bool:
    return bool(getattr(module, "parametrizations", None))


def quantizable(module: nn.Module) -> bool:
    """Whether lowbit can quantize ``module`` (plain, or a subclass with its own forward)."""
    return (not isinstance(module, QuantLayer) and layer_kind(module) is not None
            and isinstance(module._parameters.get("weight"), Tensor) and not _parametrized(module))


def float_weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with weight matrices (own parameters of 2+ dims) that lowbit does not quantize."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{n}.parametrizations.") for n, _ in out):
            continue  # the parametrized module itself is named
        if isinstance(module, QuantLayer) or quantizable(module):
            continue
        tensors = list(module._parameters.values())
        if _parametrized(module):
            tensors += [getattr(module, n) for n in module.parametrizations]
        if any(isinstance(p, Tensor) and p.dim() >= 2 for p in tensors):
            out.append((name, module))
    return out


class QuantizedSubclass(QuantLayer):
    """Front of a generated class for a subclass with its own forward (see ``quantized_subclass``)."""

    custom_forward = True

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        x = self.input_quant(x)
        params = self._parameters  # type: ignore[attr-defined]
        weight = params["weight"]
        # the subclass's forward reads self.weight: give it the quantized tensor for this call
        # (a function of the parameter, so gradients still reach it), as torch.func.functional_call does
        params["weight"] = self.weight_quant(weight)
        try:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        finally:
            params["weight"] = weight


_GENERATED: dict[type, type] = {}


def quantized_subclass(cls: type) -> type:
    """The generated quantized class of a layer subclass ``cls`` that has its own forward.

    Its MRO is ``(QuantizedSubclass, cls, ...)``: the subclass's attributes and methods stay, and
    its forward runs on the quantized weight and input. Classes are cached and registered in this
    module, so copies and pickles within a process find them.
    """
    made = _GENERATED.get(cls)
    if made is None:
        kind = layer_kind_of_class(cls)
        name = f"Quantized_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        made = type(name, (QuantizedSubclass, cls), {"__module__": __name__, "__qualname__": name,
                                                     "kind": kind.name})
        _GENERATED[cls] = made
        globals()[name] = made
    return made


def layer_kind_of_class(cls: type) -> LayerKind:
    for kind in LAYER_KINDS.values():
        if issubclass(cls, kind.float_type):
            return kind
    raise TypeError(f"{cls.__name__} is not a layer kind lowbit quantizes")


def quantize_layer(layer: nn.Module, weight_quant: WeightQuantizer, input_quant: ActQuantizer) -> nn.Module:
    """The quantized version of a ``quantizable`` layer: its kind's twin, or (custom forward) the
    layer itself with its class changed to the generated subclass."""
    if has_custom_forward(layer):
        layer.__class__ = quantized_subclass(type(layer))
        layer._attach(weight_quant, input_quant)  # type: ignore[attr-defined]
        return layer
    return LAYER_KINDS[layer_kind(layer).name].quant_type.from_float(layer, weight_quant, input_quant)


def out_channels(layer: nn.Module) -> int:
    """Number of output channels (features) of a layer of a lowbit kind."""
    return layer.out_features if layer_kind(layer).spatial == 0 else layer.out_channels


def per_output_channel(layer: nn.Module, values: Tensor, ndim: int | None = None) -> Tensor:
    """``values`` (one per output channel) shaped to broadcast against ``layer.weight``.

    For ConvTranspose with groups the output channel ``o = g * (out / groups) + j`` lives in
    weight rows ``g * (in / groups) ...`` and column ``j``, so the result is ``(in, out / groups, 1...)``.
    """
    kind = layer_kind(layer)
    ndim = layer.weight.dim() if ndim is None else ndim
    if not kind.transposed:
        return values.view((-1,) + (1,) * (ndim - 1))
    groups = layer.groups
    in_per_group = layer.weight.shape[0] // groups
    v = values.view(groups, 1, -1).expand(groups, in_per_group, values.numel() // groups)
    return v.reshape((layer.weight.shape[0], -1) + (1,) * (ndim - 2))


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every quantized layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


@torch.no_grad()
def bake_weights(model: nn.Module) -> None:
    """Replace each layer's FP weight by its quantized value, so export sees exact integers."""
    for _, layer in quant_layers(model):
        if layer.weight_quant.enabled:
            layer.weight.copy_(layer.weight_quant(layer.weight))
