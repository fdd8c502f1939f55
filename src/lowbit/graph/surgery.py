"""Turn any CNN into its quantized simulation: fold, equalize, wrap layers, assign roles."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..layer_bits import LayerBits, LayerBitsMap, resolve_layer_bits, roles_of
from ..layer_bits import record as layer_bits_record
from ..quant.layers import float_weight_layers, layer_kind, quant_layers, quantizable, quantize_layer
from ..quant.quantizer import ActQuantizer, WeightQuantizer
from ..record import QuantRecord, attach
from .equalize import equalize
from .fold import apply_fold_structure, fold_batchnorm
from .modules import set_submodule

KIND_NAMES = "Conv1d, Conv2d, ConvTranspose2d or Linear"


def count_float_layers(model: nn.Module) -> int:
    """Number of layers lowbit can quantize (float layers of a supported kind)."""
    return sum(quantizable(m) for m in model.modules())


def input_ranks(model: nn.Module) -> tuple[int, ...]:
    """Accepted numbers of input dimensions (batch included): images (4), and 3 (N x C x L) for a
    model with Conv1d layers."""
    kinds = {layer_kind(m).name for m in model.modules() if quantizable(m)} if isinstance(model, nn.Module) else set()
    return (3, 4) if "conv1d" in kinds else (4,)


def wrap_layers(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Replace every Conv1d / Conv2d / ConvTranspose2d / Linear by its quantized twin, in place.

    Subclasses that override their forward keep it (``quant.layers.quantize_layer``). Returns the
    names of weight layers of other kinds, which stay in float.
    """
    targets = [(n, m) for n, m in model.named_modules() if quantizable(m)]
    for name, layer in targets:
        kind = layer_kind(layer)
        wq = WeightQuantizer(cfg.w_bits, layer.weight.shape[kind.axis], cfg.granularity, cfg.groups,
                             cfg.w_symmetric, cfg.w_narrow, axis=kind.axis)
        aq = ActQuantizer(cfg.a_bits, cfg.a_symmetric)
        wq.to(layer.weight.device)
        aq.to(layer.weight.device)
        new = quantize_layer(layer, wq, aq)
        if new is not layer:
            set_submodule(model, name, new)
    return [n for n, _ in float_weight_layers(model)]


def warn_float_layers(model: nn.Module, names: list[str]) -> None:
    """One warning naming every weight layer that stays in float (counted as float by size reports)."""
    if not names:
        return
    modules = dict(model.named_modules())
    listed = ", ".join(f"{n or '(model)'} ({type(modules[n]).__name__})" for n in names)
    warnings.warn(f"lowbit: {len(names)} weight layer(s) of kinds lowbit does not quantize stay in float "
                  f"(only {KIND_NAMES} are quantized; size reports count them at 32 bit): {listed}",
                  UserWarning, stacklevel=3)


@torch.no_grad()
def execution_order(model: nn.Module, example: Tensor) -> list[str]:
    """Names of quantized layers in the order a forward pass calls them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, inp, name=n: order.append(name))
               for n, m in quant_layers(model)]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    seen: dict[str, None] = {}
    for n in order:
        seen.setdefault(n, None)
    return list(seen)


def assign_roles(model: nn.Module, order: list[str], cfg: QuantConfig,
                 layer_bits: LayerBitsMap | None = None) -> dict[str, LayerBits]:
    """Give every quantized layer its role and its widths from the resolved ``layer_bits`` map.

    The config's protocol (first layer input FP unless ``quantize_input``, first/last weights
    and last input at ``first_last_bits``) is the map's default entry, user entries win over it
    (``lowbit.layer_bits``). Layers never called stay in float. Returns the resolved map.
    """
    layers = dict(quant_layers(model))
    names = list(layers)
    roles = roles_of(names, order)
    channels = {n: l.weight_quant.channels for n, l in layers.items()}
    resolved = resolve_layer_bits(names, order, cfg.w_bits, cfg.a_bits, cfg.first_last_bits, cfg.quantize_input,
                                  layer_bits, channels)
    for name, layer in layers.items():
        layer.role = roles[name]
        apply_layer_bits(layer, resolved[name])
    return resolved


def apply_layer_bits(layer: nn.Module, bits: LayerBits) -> None:
    """Set a quantized layer's quantizers to its resolved widths (a None width disables the quantizer).

    Per-channel widths (``bits.channel_bits``) become the weight quantizer's ``group_bits``; a layer
    whose quantizer has scales per tensor or per group of channels gets a per-channel one first.
    """
    wq, aq = layer.weight_quant, layer.input_quant
    wq.enabled = bits.w_bits is not None
    if wq.enabled and bits.channel_bits is not None:
        if wq.num_groups != wq.channels:  # per-channel widths need per-channel scales
            wq = WeightQuantizer(bits.w_bits, wq.channels, "channel", None, wq.symmetric, wq.narrow,
                                 axis=wq.axis).to(wq.scale.device)
            layer.weight_quant = wq
        wq.set_group_bits(bits.channel_bits)
    elif wq.enabled:
        wq.bits = bits.w_bits
    aq.enabled = bits.a_bits is not None
    if aq.enabled:
        aq.bits = bits.a_bits


def prepare(model: nn.Module, cfg: QuantConfig, example: Tensor,
            fold_pairs: list[tuple[str, str]] | None = None,
            layer_bits: LayerBitsMap | None = None) -> tuple[nn.Module, dict]:
    """A quantization-ready deep copy of ``model`` (the original is not touched).

    With ``fold_pairs`` given (when rebuilding from an artifact) only the structure of those
    folds is applied; otherwise pairs are found by tracing and folded with their values.
    ``layer_bits`` are per-layer widths (``lowbit.layer_bits``). Returns the model, which carries
    its ``QuantRecord`` (``lowbit.record``) from here on, and a dict of the graph changes and of
    every layer's resolved widths (``"layer_bits"``), in the record's JSON form.
    """
    if not isinstance(model, nn.Module):
        raise LowbitError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if count_float_layers(model) == 0:
        raise LowbitError("model has no Conv2d or Linear layer to quantize (nor Conv1d or ConvTranspose2d)")
    qmodel = copy.deepcopy(model).eval()
    qmodel.to(cfg.device)
    if fold_pairs is not None:
        apply_fold_structure(qmodel, fold_pairs)
        pairs, eq_pairs = fold_pairs, []
    else:
        pairs = fold_batchnorm(qmodel) if cfg.fold_bn else []
        eq_pairs = equalize(qmodel) if cfg.equalize else []
    warn_float_layers(qmodel, wrap_layers(qmodel, cfg))
    order = execution_order(qmodel, example.to(cfg.device, copy=True))  # a copy: a model may change its input in place
    resolved = assign_roles(qmodel, order, cfg, layer_bits)
    attach(qmodel, QuantRecord(cfg, layer_order=list(order), layer_bits=dict(resolved),
                               fold_pairs=[tuple(p) for p in pairs], equalized_pairs=[tuple(p) for p in eq_pairs]))
    return qmodel, {"fold_pairs": [list(p) for p in pairs], "equalized_pairs": [list(p) for p in eq_pairs],
                    "layer_order": order, "layer_bits": layer_bits_record(resolved)}
