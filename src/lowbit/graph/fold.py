"""BatchNorm folding: find conv -> BN pairs by tracing and fold them exactly."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import LowbitError
from ..quant.layers import is_plain_layer, layer_kind, per_output_channel
from .modules import get_submodule, set_submodule

# the BatchNorm class that follows each foldable layer kind
_BN_OF_KIND = {"conv1d": nn.BatchNorm1d, "conv2d": nn.BatchNorm2d, "convtranspose2d": nn.BatchNorm2d}


class _Tracer(torch.fx.Tracer):
    """fx tracer that also keeps renamed subclasses of lowbit's layer kinds as leaves (so that they
    fold like the classes they rename); subclasses with their own forward are traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_plain_layer(m) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module):
    """``torch.fx`` graph of ``model``, or None (with a warning) when it cannot be traced."""
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # any tracing failure just means "no graph-level rewrites"
        warnings.warn(f"lowbit: model cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
                      "BatchNorm stays unfolded and equalization is skipped", stacklevel=3)
        return None


def module_graph(model: nn.Module) -> tuple[torch.fx.Graph, dict[str, nn.Module], dict[str, int]] | None:
    """Traced graph, modules by name, and how often each module is called (shared modules cannot
    be rewritten); None when the model cannot be traced."""
    graph = trace(model)
    if graph is None:
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return graph, dict(model.named_modules()), calls


def module_calls(model: nn.Module, kind: type | tuple[type, ...]
                 ) -> tuple[list[torch.fx.Node], dict[str, nn.Module], dict[str, int]]:
    """Graph nodes that call a module of type ``kind``, with modules by name and call counts
    (empty when the model cannot be traced)."""
    traced = module_graph(model)
    if traced is None:
        return [], {}, {}
    graph, modules, calls = traced
    nodes = [n for n in graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), kind)]
    return nodes, modules, calls


def find_conv_bn_pairs(model: nn.Module, scale_mergeable: bool = False) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` for each BatchNorm fed only by a conv used exactly once.

    Pairs: Conv1d -> BatchNorm1d, Conv2d -> BatchNorm2d, ConvTranspose2d -> BatchNorm2d (folded
    along its output channels), for layers whose forward is their class's own. With
    ``scale_mergeable`` (QAT, which merges BN into per-channel weight scales at the end) grouped
    ConvTranspose2d layers are left out: their per-axis scales are shared by the conv groups.
    """
    nodes, modules, calls = module_calls(model, nn.modules.batchnorm._BatchNorm)
    pairs = []
    for node in nodes:
        bn = modules[node.target]
        if bn.running_var is None:  # batch statistics at inference: not foldable
            continue
        src = node.args[0] if node.args else None
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        kind = layer_kind(conv) if conv is not None and is_plain_layer(conv) else None
        if kind is None or not isinstance(bn, _BN_OF_KIND.get(kind.name, ())):
            continue
        if scale_mergeable and kind.transposed and conv.groups > 1:
            continue
        if len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1 \
                and bn.num_features == conv.out_channels:
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` into ``conv`` in place: W' = W * g / sigma, b' = beta + (b - mu) * g / sigma,
    per output channel (dim 0 of Conv weights, dim 1 of ConvTranspose weights)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(std)
    conv.weight.copy_((conv.weight.double() * per_output_channel(conv, factor)).to(conv.weight.dtype))
    new_bias = (beta + (bias - bn.running_mean.double()) * factor).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def _fold_target(model: nn.Module, name: str, pair: tuple[str, str]) -> nn.Module:
    try:
        return get_submodule(model, name)
    except AttributeError:
        raise LowbitError(f"fold pair {list(pair)}: the model has no module {name!r}") from None


def _out_channels(layer: nn.Module) -> int | None:
    """Output channels of a conv-like or linear layer (what a following BatchNorm normalizes), else None."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.out_channels
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return None


def apply_fold_structure(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Replace each paired BN by Identity and give its conv a bias (values are set elsewhere).

    Pairs come from tracing or from an artifact's manifest, so each is checked first: a conv-like
    or linear layer and a BatchNorm of its channel count, each in one pair only (LowbitError).
    """
    seen: set[str] = set()
    for pair in pairs:
        conv_name, bn_name = pair
        conv, bn = _fold_target(model, conv_name, pair), _fold_target(model, bn_name, pair)
        channels = _out_channels(conv)
        if channels is None:
            raise LowbitError(f"fold pair {list(pair)}: {conv_name!r} is a {type(conv).__name__}, "
                              "not a conv or linear layer")
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise LowbitError(f"fold pair {list(pair)}: {bn_name!r} is a {type(bn).__name__}, not a BatchNorm")
        if bn.num_features != channels:
            raise LowbitError(f"fold pair {list(pair)}: the BatchNorm has {bn.num_features} channels, "
                              f"the layer {channels}")
        if conv_name in seen or bn_name in seen:
            raise LowbitError(f"fold pair {list(pair)}: a module folds into one other module only")
        seen |= {conv_name, bn_name}
    for conv_name, bn_name in pairs:
        conv = get_submodule(model, conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(_out_channels(conv), device=conv.weight.device,
                                                 dtype=conv.weight.dtype))
        set_submodule(model, bn_name, nn.Identity())


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable conv -> BN pair of ``model`` in place; returns the pairs folded."""
    pairs = find_conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        fold_conv_bn(get_submodule(model, conv_name), get_submodule(model, bn_name))
    apply_fold_structure(model, pairs)
    return pairs
