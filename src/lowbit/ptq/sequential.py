"""Layer-by-layer calibration in one pass: the FP and the quantized network walked in lockstep.

Methods that quantize layer after layer with error compensation (Bit-Split, layer-wise
rounding) need, for each layer, its input in the FP network and its input in the network
whose earlier layers are already quantized. Re-running the network for every layer costs
O(L^2) forward passes; walking a torch.fx graph node by node with two environments costs one.
Models that cannot be traced fall back to hooks and re-running (same results, slower).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.fx import Node
from torch.fx.node import map_arg

from ..config import QuantConfig
from ..errors import LowbitError
from ..progress import progress_bar
from .common import fresh_batch, quantizers_disabled
from ..quant.layers import QUANT_LAYERS, quant_layers

# visit(name, layer, fp_input, quant_input, (weights_on, inputs_on)) quantizes ``layer`` in place:
# it calibrates the quantizers that are meant to be on and enables them.
Visit = Callable[[str, nn.Module, Tensor, Tensor, tuple[bool, bool]], None]


class _QuantLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QUANT_LAYERS) or super().is_leaf_module(m, qualname)


def trace_quantized(model: nn.Module) -> torch.fx.Graph | None:
    """Graph of ``model`` with quantized layers as leaves, or None if it cannot be traced."""
    try:
        return _QuantLeafTracer().trace(model)
    except Exception:  # untraceable models use the hook fallback
        return None


def _fetch_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _run_node(node: Node, model: nn.Module, modules: dict[str, nn.Module], env: dict[Node, list], i: int):
    args = map_arg(node.args, lambda n: env[n][i])
    kwargs = map_arg(node.kwargs, lambda n: env[n][i])
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "get_attr":
        return _fetch_attr(model, node.target)
    raise LowbitError(f"unsupported graph node {node.op}")


def _set_layer_enabled(layer: nn.Module, weight: bool, inputs: bool) -> tuple[bool, bool]:
    old = (layer.weight_quant.enabled, layer.input_quant.enabled)
    layer.weight_quant.enabled, layer.input_quant.enabled = weight, inputs
    return old


@torch.no_grad()
def walk_layers(model: nn.Module, calib: Tensor, cfg: QuantConfig, visit: Visit,
                layer_names: list[str] | None = None, desc: str = "layers") -> None:
    """Call ``visit`` for every quantized layer in execution order with its FP and quantized inputs.

    On entry the quantizers of the layers to visit are switched off; ``visit`` must leave its
    layer in its final quantized state. ``layer_names`` limits which layers are visited (others
    keep their current state and are simply run).
    """
    layers = dict(quant_layers(model))
    todo = set(layers if layer_names is None else layer_names)
    saved = {n: _set_layer_enabled(layers[n], False, False) for n in todo}
    bar = progress_bar(range(len(todo)), desc=desc, enable=cfg.progress)
    inner = visit

    def visit(*args) -> None:  # noqa: F811  (the same visit, ticking the progress bar)
        inner(*args)
        bar.update(1)

    graph = trace_quantized(model)
    if graph is None or any(sum(1 for n in graph.nodes if n.op == "call_module" and n.target == t) != 1 for t in todo):
        _walk_with_hooks(model, calib, cfg, visit, layers, todo, saved)
        return
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    last_use: dict[Node, int] = {}
    for idx, node in enumerate(nodes):
        for inp in node.all_input_nodes:
            last_use[inp] = idx
    # two private copies of the input: in-place graph ops may rewrite either, never ``calib``
    chunks = [fresh_batch(calib, cfg.device, slice(i, i + cfg.batch_size)) for i in range(0, len(calib), cfg.batch_size)]
    env_fp: dict[Node, list] = {}
    env_q: dict[Node, list] = {}
    for idx, node in enumerate(nodes):
        if node.op == "placeholder":
            env_fp[node] = chunks
            env_q[node] = [c.clone() for c in chunks]
        elif node.op == "output":
            break
        elif node.op == "call_module" and node.target in todo:
            layer = layers[node.target]
            src = node.args[0]
            x_fp, x_q = torch.cat(env_fp[src]), torch.cat(env_q[src])
            # FP output first: visit may overwrite the layer's weight and bias in place
            env_fp[node] = [_run_node(node, model, modules, env_fp, i) for i in range(len(chunks))]
            visit(node.target, layer, x_fp, x_q, saved[node.target])
            env_q[node] = [_run_node(node, model, modules, env_q, i) for i in range(len(chunks))]
            del x_fp, x_q
        elif node.op == "call_module" and node.target in layers:  # a layer not being visited: FP in env_fp
            with quantizers_disabled(layers[node.target]):
                env_fp[node] = [_run_node(node, model, modules, env_fp, i) for i in range(len(chunks))]
            env_q[node] = [_run_node(node, model, modules, env_q, i) for i in range(len(chunks))]
        else:
            env_fp[node] = [_run_node(node, model, modules, env_fp, i) for i in range(len(chunks))]
            env_q[node] = [_run_node(node, model, modules, env_q, i) for i in range(len(chunks))]
        for inp in node.all_input_nodes:
            if last_use.get(inp) == idx:
                env_fp.pop(inp, None)
                env_q.pop(inp, None)


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: dict[str, nn.Module], calib: Tensor, cfg: QuantConfig,
                   last: str | None = None) -> dict[str, Tensor]:
    """Inputs reaching each of ``layers`` (before their own quantizers), via forward pre-hooks.

    The forward pass is cut short once ``last`` has been reached.
    """
    got: dict[str, list[Tensor]] = {n: [] for n in layers}

    def make_hook(name: str):
        def hook(_mod, inputs):
            # a copy: the model may change this tensor in place after the layer has read it
            got[name].append(inputs[0].detach().clone())
            if name == last:
                raise _Captured
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(n)) for n, layer in layers.items()]
    try:
        for i in range(0, len(calib), cfg.batch_size):
            try:
                model(fresh_batch(calib, cfg.device, slice(i, i + cfg.batch_size)))
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, c in got.items() if not c]
    if missing:
        raise LowbitError(f"quantized layers {missing[:3]} were not reached by the calibration forward pass")
    return {n: torch.cat(c) for n, c in got.items()}


def _walk_with_hooks(model: nn.Module, calib: Tensor, cfg: QuantConfig, visit: Visit, layers: dict[str, nn.Module],
                     todo: set[str], saved: dict[str, tuple[bool, bool]]) -> None:
    from ..graph.surgery import execution_order

    order = [n for n in execution_order(model, fresh_batch(calib, cfg.device, slice(0, 1))) if n in todo]
    with quantizers_disabled(model):
        fp_inputs = capture_inputs(model, {n: layers[n] for n in order}, calib, cfg)
    for name in order:
        x_q = capture_inputs(model, {name: layers[name]}, calib, cfg, last=name)[name]
        visit(name, layers[name], fp_inputs.pop(name), x_q, saved[name])
