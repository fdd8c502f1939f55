"""Remove pruned (0-bit) output channels from an exported QDQ graph where that is exact.

A pruned channel of a layer has zero weights, so its output is a constant: the layer's (folded)
bias, then whatever per-element ops follow. The channel can leave the graph when every path from
the layer's output ends in the data input of a plain convolution (``group == 1``) through ops
that act on each element alone and keep the channel a known constant: the bias ``Add``, ``Relu``,
``Clip`` and a per-tensor ``QuantizeLinear -> DequantizeLinear`` (computed here as ONNX Runtime
computes them: float32, round half to even, saturation). At each such consumer the constant
``d`` of the channel is

* 0 (a ReLU'd negative bias, or a code equal to the zero point): the consumer's input channel
  contributes nothing, so it is dropped;
* not 0, and the consumer has no padding and a float bias: the channel adds ``d * sum(w[:, k])``
  at every output position, which goes into the consumer's bias;
* otherwise (zero padding makes the contribution position-dependent; an int32 bias cannot take a
  float term exactly) the channel stays, as zero codes.

Then the producer loses the channel's weight rows, scales, zero points and bias, and every
consumer the matching input columns. A channel stays (zero codes) wherever this is not exact or
not known to be: residual ``Add``, ``Concat``, depthwise/grouped consumers, pooling, ``Gemm``
heads, graph outputs, sparse-code gates, a layer whose weight is used twice, ConvTranspose.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_qdq import WeightSpec, constant_values, int_initializer

_INT_RANGE = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
              TensorProto.INT16: (-32768, 32767)}
_PACKED = (TensorProto.INT2, TensorProto.UINT2, TensorProto.INT4, TensorProto.UINT4)  # int_initializer packs them


class _Graph:
    """Index of a graph: who produces and who consumes each value, initializers by name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.consts = constant_values(graph)
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for value in dict.fromkeys(node.input):
                if value:
                    self.users.setdefault(value, []).append(node)

    def uses(self, value: str) -> int:
        return len(self.users.get(value, ())) + (value in self.outputs)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def replace(self, name: str, values: np.ndarray) -> None:
        """Overwrite initializer ``name`` with ``values`` in its own data type."""
        old = self.inits[name]
        if old.data_type in _PACKED:
            new = int_initializer(name, np.asarray(values), old.data_type)
        else:  # float, int64 shapes, int32 biases, 8/16-bit codes
            new = numpy_helper.from_array(np.asarray(values).astype(helper.tensor_dtype_to_np_dtype(old.data_type)),
                                          name)
        old.CopyFrom(new)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Weight:
    """An editable weight input of a Conv: integer codes behind a DequantizeLinear (optionally the
    2-bit Reshape guard) or a float initializer, each used by this Conv only."""

    def __init__(self, g: _Graph, conv: onnx.NodeProto) -> None:
        self.g, self.reshape, self.dq, self.codes = g, None, None, None
        value = conv.input[1]
        if g.uses(value) != 1:
            raise ValueError("weight used twice")
        node = g.producer.get(value)
        if node is not None and node.op_type == "Reshape":
            if node.input[1] not in g.inits or g.uses(node.input[0]) != 1 or g.uses(node.input[1]) != 1:
                raise ValueError("weight reshape not editable")
            self.reshape, value = node, node.input[0]
            node = g.producer.get(value)
        if node is None:
            if value not in g.inits or g.inits[value].data_type != TensorProto.FLOAT:
                raise ValueError("weight is not an initializer")
            self.codes = value
            return
        if node.op_type != "DequantizeLinear" or node.input[0] not in g.inits:
            raise ValueError("weight is not DequantizeLinear of an initializer")
        if any(g.uses(v) != 1 for v in node.input if v):
            raise ValueError("weight parameters shared")
        self.dq, self.codes = node, node.input[0]

    def values(self) -> np.ndarray:
        """The float32 weight as ONNX Runtime computes it (``(q - z) * s`` per channel)."""
        q = self.g.array(self.codes)
        if self.dq is None:
            return q.astype(np.float32)
        q = q.astype(np.int64)
        scale = self.g.array(self.dq.input[1]).astype(np.float32)
        zero = self.g.array(self.dq.input[2]).astype(np.int64) if len(self.dq.input) > 2 and self.dq.input[2] \
            else np.zeros_like(scale, dtype=np.int64)
        if scale.ndim:
            axis = _attr(self.dq, "axis", 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        w = ((q - zero).astype(np.float32) * scale).astype(np.float32)
        return w.reshape(w.shape[:-1]) if self.reshape is not None else w

    def delete(self, index: list[int], axis: int) -> None:
        """Remove ``index`` along ``axis`` (0: output channels, with their scales; 1: input channels)."""
        g = self.g
        g.replace(self.codes, np.delete(g.array(self.codes), index, axis))
        if axis == 0 and self.dq is not None:
            for param in self.dq.input[1:]:
                if param and g.array(param).ndim:
                    g.replace(param, np.delete(g.array(param), index, 0))
        if self.reshape is not None:
            shape = g.array(self.reshape.input[1]).copy()
            shape[axis] -= len(index)
            g.replace(self.reshape.input[1], shape)


def _bias_of(g: _Graph, conv: onnx.NodeProto, channels: int) -> tuple[np.ndarray, str, list[tuple[str, int]], bool]:
    """``(bias, output value, [(initializer, channel axis)] holding it, float_editable)`` of a Conv.

    The bias is the Conv's third input (a float initializer or lowbit's int32 ``DequantizeLinear``)
    or an initializer added right after it (the float bias of a layer with a quantized input).
    """
    if len(conv.input) > 2 and conv.input[2]:
        value = conv.input[2]
        if g.uses(value) != 1:
            raise ValueError("bias shared")
        if value in g.inits and g.inits[value].data_type == TensorProto.FLOAT:
            return g.array(value).astype(np.float32).reshape(-1), conv.output[0], [(value, 0)], True
        node = g.producer.get(value)
        if node is not None and node.op_type == "DequantizeLinear" and all(v in g.inits for v in node.input[:2]):
            q, s = g.array(node.input[0]).astype(np.int64), g.array(node.input[1]).astype(np.float32)
            held = [(node.input[0], 0)] + ([(node.input[1], 0)] if s.ndim else [])
            if any(g.uses(v) != 1 for v, _ in held):
                raise ValueError("int32 bias shared")
            return (q.astype(np.float32) * s).astype(np.float32), conv.output[0], held, False
        raise ValueError("bias is not a constant")
    users = g.users.get(conv.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add" and g.uses(conv.output[0]) == 1:
        add = users[0]
        other = add.input[1] if add.input[0] == conv.output[0] else add.input[0]
        if other in g.inits and g.uses(other) == 1:
            b = g.array(other)
            if b.ndim >= 2 and b.shape[1] == channels and b.size == channels:
                return b.astype(np.float32).reshape(-1), add.output[0], [(other, 1)], True
    return np.zeros(channels, dtype=np.float32), conv.output[0], [], False


def _plain_conv(node: onnx.NodeProto, value: str) -> bool:
    return node.op_type == "Conv" and node.input[0] == value and value not in node.input[1:] \
        and _attr(node, "group", 1) == 1


def _follow(g: _Graph, value: str, const: np.ndarray, channels: list[int],
            through: list) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    """The plain Convs every path from ``value`` ends in, each with the constant input of ``channels``
    there (NaN: not constant); depthwise convs on the way are appended to ``through``. ValueError when
    some path meets anything else (the channels then stay)."""
    if value in g.outputs or not g.users.get(value):
        raise ValueError("reaches a graph output")
    leaves = []
    for node in g.users[value]:
        if _plain_conv(node, value):
            leaves.append((node, const))
            continue
        if node.input[0] != value or value in node.input[1:]:
            raise ValueError(f"used by {node.op_type}")
        if _depthwise(node, value, g):
            # channel k of a depthwise conv sees only input channel k: a zero input gives its bias at
            # every position; a nonzero constant gives d * sum(w_k) + b_k only without padding
            w = _Weight(g, node)
            kernel = w.values().astype(np.float32)
            bias, out, inits, _ = _bias_of(g, node, kernel.shape[0])
            through.append((node, w, inits))
            sums = kernel.reshape(kernel.shape[0], -1).sum(1)[channels]
            moved = np.where(const == 0, bias[channels],
                             const * sums + bias[channels] if _no_padding(node) else np.nan)
            leaves += _follow(g, out, moved.astype(np.float32), channels, through)
        elif node.op_type == "Relu":
            leaves += _follow(g, node.output[0], np.maximum(const, np.float32(0)), channels, through)
        elif node.op_type == "Clip":
            lo, hi = (_scalar(g, node, i) for i in (1, 2))
            out = const if lo is None else np.maximum(const, np.float32(lo))
            leaves += _follow(g, node.output[0], out if hi is None else np.minimum(out, np.float32(hi)), channels,
                              through)
        elif node.op_type == "QuantizeLinear":
            dq = g.users.get(node.output[0], [])
            if (len(dq) != 1 or dq[0].op_type != "DequantizeLinear" or g.uses(node.output[0]) != 1
                    or list(dq[0].input[1:]) != list(node.input[1:])):
                raise ValueError("QuantizeLinear without its DequantizeLinear")
            scale = _scalar(g, node, 1)
            zp_name = node.input[2] if len(node.input) > 2 else ""
            zero = _scalar(g, node, 2) or 0
            lo, hi = _INT_RANGE.get(g.inits[zp_name].data_type if zp_name in g.inits else TensorProto.UINT8,
                                    (None, None))
            if scale is None or lo is None:
                raise ValueError("QuantizeLinear parameters not scalar constants")
            s = np.float32(scale)
            with np.errstate(invalid="ignore"):  # NaN (not constant) stays NaN
                q = np.clip(np.rint((const / s).astype(np.float32)) + zero, lo, hi)
            leaves += _follow(g, dq[0].output[0], ((q - zero).astype(np.float32) * s).astype(np.float32), channels,
                              through)
        else:
            raise ValueError(f"used by {node.op_type}")
    return leaves


def _depthwise(node: onnx.NodeProto, value: str, g: _Graph) -> bool:
    """A Conv with one input channel per group, one output channel per group (editable weight)."""
    if node.op_type != "Conv" or node.input[0] != value or value in node.input[1:]:
        return False
    try:
        shape = _Weight(g, node).values().shape
    except ValueError:
        return False
    return shape[1] == 1 and _attr(node, "group", 1) == shape[0]


def _scalar(g: _Graph, node: onnx.NodeProto, index: int) -> float | None:
    """A scalar constant input (None when absent); ValueError when it is not a known scalar."""
    if len(node.input) <= index or not node.input[index]:
        return None
    value = g.consts.get(node.input[index])
    if value is None or value.size != 1:
        raise ValueError(f"{node.op_type} parameter is not a scalar constant")
    return value.reshape(()).item()


def _no_padding(conv: onnx.NodeProto) -> bool:
    return _attr(conv, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", "NOTSET", "VALID") \
        and not any(_attr(conv, "pads", []))


def drop_pruned_channels(graph: onnx.GraphProto, weights: dict[str, WeightSpec]) -> dict[str, dict[str, Any]]:
    """Remove every pruned output channel of ``weights``' layers whose removal is exact (module docstring).

    Returns, per layer with pruned channels, ``{"pruned", "removed", "folded"}`` counts and, when
    some stay as zero codes, ``"kept"``: why.
    """
    report: dict[str, dict[str, Any]] = {}
    for name, spec in weights.items():
        if not spec.pruned:
            continue
        row = report[name] = {"pruned": len(spec.pruned), "removed": 0, "folded": 0}
        try:
            row.update(_drop_layer(_Graph(graph), name, list(spec.pruned)))
        except ValueError as exc:
            row["kept"] = str(exc)
    return report


def _drop_layer(g: _Graph, name: str, pruned: list[int]) -> dict[str, Any]:
    codes = f"{name}.weight_q"
    dqs = g.users.get(codes, [])
    if len(dqs) != 1:
        raise ValueError("weight used twice" if dqs else "weight not in the graph")
    out = dqs[0].output[0]
    if g.users.get(out) and g.users[out][0].op_type == "Reshape":
        out = g.users[out][0].output[0]
    convs = g.users.get(out, [])
    if len(convs) != 1 or convs[0].op_type != "Conv":
        raise ValueError("not a Conv")
    if _attr(convs[0], "group", 1) != 1:
        raise ValueError("a grouped/depthwise conv (its input channel would have to go too)")
    conv = convs[0]
    weight = _Weight(g, conv)
    channels = weight.values().shape[0]
    bias, value, bias_inits, _ = _bias_of(g, conv, channels)
    through: list = []
    leaves = _follow(g, value, bias[pruned], pruned, through)
    edits = []
    removable = {c for c, d in zip(pruned, bias[pruned]) if np.isfinite(d)}
    for leaf, const in leaves:
        w = _Weight(g, leaf)
        lb, _, lb_inits, editable = _bias_of(g, leaf, w.values().shape[0])
        foldable = editable and _no_padding(leaf)
        removable &= {c for c, d in zip(pruned, const) if d == 0 or (foldable and np.isfinite(d))}
        edits.append((leaf, w, lb, lb_inits, const, foldable))
    drop = [c for c in pruned if c in removable]
    if not drop:
        raise ValueError("their constants are nonzero before a padded conv (or one with an int32 bias)")
    folded = 0
    for leaf, w, lb, lb_inits, const, foldable in edits:
        d = np.array([const[pruned.index(c)] for c in drop], dtype=np.float32)
        if (d != 0).any():
            # no padding: input channel k adds d_k * sum(w[:, k]) at every output position
            extra = (w.values()[:, drop].astype(np.float64).reshape(len(lb), len(drop), -1).sum(-1) @ d)
            new_bias = (lb.astype(np.float64) + extra).astype(np.float32)
            name_, axis = lb_inits[0]
            g.replace(name_, new_bias.reshape(g.array(name_).shape))
            folded += int((d != 0).sum())
        w.delete(drop, 1)
    weight.delete(drop, 0)
    for init, axis in bias_inits:
        g.replace(init, np.delete(g.array(init), drop, axis))
    for node, w, inits in through:  # depthwise convs lose the channels too (one group each)
        w.delete(drop, 0)
        for init, axis in inits:
            g.replace(init, np.delete(g.array(init), drop, axis))
        group = next(a for a in node.attribute if a.name == "group")
        group.i -= len(drop)
    result: dict[str, Any] = {"removed": len(drop), "folded": folded}
    if len(drop) < len(pruned):
        result["kept"] = "their constants are nonzero before a padded conv (or one with an int32 bias)"
    return result
