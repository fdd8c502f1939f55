"""Turn any CNN into its quantized simulation: fold, equalize, declare every layer's spec, wrap layers."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..layer_bits import LayerBits, LayerBitsMap, resolve_layer_bits, roles_of
from ..layer_bits import record as layer_bits_record
from ..quant.declare import declare_layer
from ..quant.layer_specs import quantized_layer
from ..quant.layers import float_weight_layers, layer_kind, out_channels, quant_layers, quantizable
from ..quant.spec import LayerSpec
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


def float_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer lowbit can quantize (``quant.layers.quantizable``), in module order."""
    return [(n, m) for n, m in model.named_modules() if quantizable(m)]


def float_spec(name: str, layer: nn.Module, role: str, cfg: QuantConfig, bits: LayerBits) -> LayerSpec:
    """The declared spec (``quant.declare``) of the float ``layer`` at its resolved widths ``bits``."""
    kind = layer_kind(layer)
    return declare_layer(name, kind.name, role, tuple(layer.weight.shape), out_channels(layer), cfg, bits)


def wrap_layer(model: nn.Module, name: str, layer: nn.Module, spec: LayerSpec, cfg: QuantConfig) -> nn.Module:
    """Put the quantized twin of the float ``layer`` (``model``'s module ``name``) in its place, with the
    quantizers ``spec`` describes (``quant.layer_specs.quantized_layer``); returns it.

    A float part of ``spec`` keeps the quantizer the config's uniform widths declare for the layer,
    switched off (``quant.declare``). Subclasses that override their forward keep it.
    """
    idle = float_spec(name, layer, spec.role, cfg, LayerBits(cfg.w_bits, cfg.a_bits))
    new = quantized_layer(layer, spec, idle, cfg.a_symmetric)
    if new is not layer:
        set_submodule(model, name, new)
    return new


def wrap_layers(model: nn.Module, cfg: QuantConfig, specs: Mapping[str, LayerSpec] | None = None) -> list[str]:
    """Replace every Conv1d / Conv2d / ConvTranspose2d / Linear by its quantized twin, in place
    (``wrap_layer``), built from its spec in ``specs`` (declared, from ``declare``); a layer without one
    is declared at the config's uniform widths (role "body"). Returns the names of weight layers of
    other kinds, which stay in float.
    """
    uniform = LayerBits(cfg.w_bits, cfg.a_bits)
    for name, layer in float_layers(model):
        spec = specs[name] if specs is not None and name in specs else float_spec(name, layer, "body", cfg, uniform)
        wrap_layer(model, name, layer, spec, cfg)
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
def execution_order(model: nn.Module, example: Tensor, layers: list[tuple[str, nn.Module]] | None = None) -> list[str]:
    """Names of ``layers`` (default: the quantized layers) in the order a forward pass of ``model`` on
    ``example`` calls them (each name once, at its first call)."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, inp, name=n: order.append(name))
               for n, m in (quant_layers(model) if layers is None else layers)]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    seen: dict[str, None] = {}
    for n in order:
        seen.setdefault(n, None)
    return list(seen)


def declare(layers: list[tuple[str, nn.Module]], order: list[str], cfg: QuantConfig,
            layer_bits: LayerBitsMap | None = None) -> tuple[dict[str, LayerSpec], dict[str, LayerBits]]:
    """Every float layer's role, resolved widths and declared spec, before any quantizer exists.

    The config's protocol (first layer input FP unless ``quantize_input``, first/last weights
    and last input at ``first_last_bits``) is the map's default entry, user entries win over it
    (``lowbit.layer_bits``). Layers never called stay in float. Returns the declared specs
    (``quant.declare``) and the resolved map, by layer name.
    """
    names = [n for n, _ in layers]
    roles = roles_of(names, order)
    channels = {n: l.weight.shape[layer_kind(l).axis] for n, l in layers}
    resolved = resolve_layer_bits(names, order, cfg.w_bits, cfg.a_bits, cfg.first_last_bits, cfg.quantize_input,
                                  layer_bits, channels)
    specs = {n: float_spec(n, l, roles[n], cfg, resolved[n]) for n, l in layers}
    return specs, resolved


def prepare(model: nn.Module, cfg: QuantConfig, example: Tensor,
            fold_pairs: list[tuple[str, str]] | None = None,
            layer_bits: LayerBitsMap | None = None) -> tuple[nn.Module, dict]:
    """A quantization-ready deep copy of ``model`` (the original is not touched).

    With ``fold_pairs`` given (when rebuilding from an artifact) only the structure of those
    folds is applied; otherwise pairs are found by tracing and folded with their values.
    ``layer_bits`` are per-layer widths (``lowbit.layer_bits``). The float layers' call order comes
    from hooks on them; then every layer's widths are resolved and its spec declared (``declare``,
    ``quant.declare``), and each quantizer is built once from its declared spec (``wrap_layers``).
    Returns the model, which carries its ``QuantRecord`` (``lowbit.record``) from here on (the
    declaration included: ``declared``), and a dict of the graph changes and of every layer's
    resolved widths (``"layer_bits"``), in the record's JSON form.
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
    layers = float_layers(qmodel)
    warn_float_layers(qmodel, [n for n, _ in float_weight_layers(qmodel)])
    # the call order of the float layers (a copy of the example: a model may change its input in place)
    order = execution_order(qmodel, example.to(cfg.device, copy=True), layers)
    specs, resolved = declare(layers, order, cfg, layer_bits)
    wrap_layers(qmodel, cfg, specs)  # every quantizer built once, from its declared spec
    attach(qmodel, QuantRecord(cfg, layer_order=list(order), layer_bits=dict(resolved), declared=specs,
                               fold_pairs=[tuple(p) for p in pairs], equalized_pairs=[tuple(p) for p in eq_pairs]))
    return qmodel, {"fold_pairs": [list(p) for p in pairs], "equalized_pairs": [list(p) for p in eq_pairs],
                    "layer_order": order, "layer_bits": layer_bits_record(resolved)}
