"""Integer-only reference inference: what a fixed-point device computes for a quantized model.

Each quantized layer becomes an ``IntegerConv1d`` / ``IntegerConv2d`` / ``IntegerConvTranspose2d`` /
``IntegerLinear``:

* input codes ``q_x`` (zero point ``z_x``) and weight codes ``q_w`` (zero point ``z_w`` per
  output channel, along dim 1 of ConvTranspose weights), exactly the codes the ONNX export stores
  (both read from the layers' specs, ``quant.layer_specs``); per-layer widths and per-channel widths
  need nothing else: each channel's codes lie in its own range (binary channels ``+-1``, pruned
  channels 0 with zero point 0, so they contribute nothing and output their integer bias);
* integer accumulation ``acc = sum (q_x - z_x)(q_w - z_w) + b_int``, the bias in int32 at scale
  ``s_x * s_w`` (``b_int = round(b / (s_x s_w))``, TFLite's convention). The products are formed
  in float64 on integer-valued tensors, which is exact (every partial sum is an integer below
  2^53), and held as int64; ``max_abs_acc`` / ``fits_int32`` check the int32 register;
* fixed-point requantization: when a layer's output reaches the next quantized layers only
  through ReLU / ReLU6 / Identity / Dropout and all of them quantize it identically, the layer
  emits their input codes directly, ``clamp(z_out + ((acc * M0 + 2^(n-1)) >> n), qmin, qmax)``
  with an int32 multiplier ``M0`` and shift ``n`` (``M0 2^-n = s_x s_w / s_out``, round half
  up), and ReLU / ReLU6 become integer clamps at ``z_out`` / ``z_out + round(6 / s_out)``;
* otherwise the accumulator is dequantized, ``y = acc * s_x * s_w`` (float32), because the
  consumer is a float operation.

Left in floating point (documented deviations from a pure integer device): elementwise ops that
are not folded into requantization (residual Add, Concat, pooling, channel shuffle, a ReLU after
an Add) and the quantization of their float results into the next layer's codes; layers whose
input is not quantized (by the protocol the first layer, which sees the FP image) multiply the
float input by the integer weights; layers with disabled weight quantizers run in float; layers
of a subclass with its own forward keep that forward: they run as in the simulation (quantized
input, dequantized integer weights, float arithmetic), since lowbit cannot know what it computes.

Agreement with the simulation: the simulation keeps biases in float, and in deep networks one
code flipped by the int32 bias rounding propagates, so at 4 bit the device result can differ on
several percent of the images. ``with_int32_bias(qmodel)`` is the simulation with the device's
bias rounding (the integer path matches it up to requantization ties), and ``bias_frac_bits=k``
keeps ``k`` extra fractional bits of bias (accumulator scaled by ``2^k``), which closes the gap
at the price of wider accumulators. ``integer_agreement`` measures logits, argmax and codes.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import LowbitError
from ..graph.modules import set_submodule
from ..quant import spec as qspec
from ..quant.layer_specs import layer_specs
from ..quant.layers import QUANT_LAYERS, QuantLayer, out_channels, quant_layers
from ..quant.spec import sparse_gate
from .artifact import require_quantized
from .onnx_qdq import InputSpec, WeightSpec, collect_specs

_ACC_LIMIT = 2 ** 31 - 1
_PASS_MODULES = (nn.Identity, nn.Dropout)
_RELU_FUNCTIONS = {torch.relu, torch.relu_, nn.functional.relu}
_RELU6_FUNCTIONS = {nn.functional.relu6}


def quantize_multiplier(m: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel real multipliers ``m > 0`` as int32 ``M0`` in [2^30, 2^31) and ``shift``, ``m ~ M0 2^-shift``.

    Multipliers below 2^-31 keep ``shift = 62`` and a smaller ``M0``.
    """
    m0, shifts = [], []
    for value in m.double().tolist():
        if not value > 0 or not math.isfinite(value):
            raise LowbitError(f"requantization multiplier must be positive and finite, got {value}")
        mant, exp = math.frexp(value)  # value = mant * 2^exp, mant in [0.5, 1)
        q = round(mant * 2 ** 31)
        if q == 2 ** 31:
            q, exp = q // 2, exp + 1
        shift = 31 - exp
        if shift < 1:
            raise LowbitError(f"requantization multiplier {value:g} is outside the fixed-point range")
        if shift > 62:  # a vanishing multiplier: keep the shift within int64 and drop low bits instead
            q, shift = q >> (shift - 62), 62
        m0.append(q)
        shifts.append(shift)
    return torch.tensor(m0, dtype=torch.int64), torch.tensor(shifts, dtype=torch.int64)


def fixed_point_rescale(acc: Tensor, m0: Tensor, shift: Tensor) -> Tensor:
    """``round(acc * M0 * 2^-shift)`` with round-half-up, in int64.

    With int32 accumulators (``|acc| < 2^31``) the product fits int64 exactly; wider accumulators
    (16-bit codes) drop low multiplier bits so that it still does.
    """
    peak = int(acc.abs().max().item()) if acc.numel() else 0
    excess = max(0, peak.bit_length() + 31 - 62)
    if excess:
        m0, shift = m0 >> excess, (shift - excess).clamp_min(1)
    return (acc * m0 + (torch.ones_like(shift) << (shift - 1))) >> shift


@dataclass(frozen=True)
class OutputCodes:
    """Where a layer's accumulator goes when it feeds quantizers directly: their scale and code range."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    threshold: float | None = None  # sparse codes (quant.sparse): the zero code up to this real value


class _IntegerLayer(nn.Module):
    """Shared state and arithmetic of integer conv / linear layers."""

    def __init__(self, name: str, layer: QuantLayer, specs_w: WeightSpec | None, specs_in: InputSpec | None,
                 bias_frac_bits: int = 0) -> None:
        super().__init__()
        self.name = name
        self.bias_frac_bits = bias_frac_bits
        self.int_weight = specs_w is not None
        self.int_input = specs_in is not None
        self.input_codes = False  # set when the producer requantizes into this layer's codes
        if self.int_weight:
            # zero points and scales along the weight's channel axis (dim 1 of ConvTranspose weights)
            shape = tuple(-1 if d == specs_w.axis else 1 for d in range(layer.weight.dim()))
            codes = torch.from_numpy(specs_w.codes.reshape(tuple(layer.weight.shape)))
            z_w = torch.from_numpy(specs_w.zero_point)
            self.register_buffer("w_centered", (codes - z_w.view(shape)).to(torch.int32))  # q_w - z_w
            self.register_buffer("w_scale", torch.from_numpy(specs_w.scale).double().view(shape))
            # accumulator scales run over the output channels (ConvTranspose: tiled over its groups)
            self.register_buffer("s_w", torch.from_numpy(specs_w.out_scale).double()
                                 .expand(out_channels(layer)).clone())
        else:
            self.register_buffer("w_float", layer.weight.detach().float().cpu().clone())
        self.register_buffer("bias_float", None if layer.bias is None else layer.bias.detach().double().cpu().clone())
        if self.int_input:
            self.s_x, self.z_x = specs_in.scale, specs_in.zero_point
            self.qmin_x, self.qmax_x = specs_in.qmin, specs_in.qmax
            self.threshold_x = specs_in.threshold  # sparse codes (TSQ): zero up to it, see quant.sparse
        self.out: OutputCodes | None = None
        self.max_abs_acc = 0
        self.last_input_codes: Tensor | None = None
        self.capture = False

    @property
    def integer(self) -> bool:
        """True when both inputs and weights are integer codes (integer accumulation)."""
        return self.int_weight and self.int_input

    def acc_scale(self) -> Tensor:
        """Real value of one accumulator unit per output channel, ``s_x * s_w * 2^-bias_frac_bits`` (float64)."""
        return self.s_x * self.s_w / 2 ** self.bias_frac_bits

    def bias_int(self) -> Tensor | None:
        """The bias as integers in accumulator units."""
        if self.bias_float is None:
            return None
        return torch.round(self.bias_float / self.acc_scale()).to(torch.int64)

    def quantize_input(self, x: Tensor) -> Tensor:
        """Codes of a float input exactly as the simulation computes them (float32 division, half-even)."""
        s = torch.tensor(self.s_x, dtype=torch.float32)
        x = x.float()
        if self.threshold_x is not None:  # the same float gate as the simulation and the ONNX graph
            x = sparse_gate(x, torch.tensor(self.threshold_x, dtype=torch.float32, device=x.device), s.to(x.device))
        return torch.clamp(torch.round(x / s) + self.z_x, self.qmin_x, self.qmax_x).to(torch.int64)

    def linear_op(self, x: Tensor, w: Tensor, *args: Any) -> Tensor:
        raise NotImplementedError

    def set_output_codes(self, out: OutputCodes) -> None:
        self.out = out
        m0, shift = quantize_multiplier(self.acc_scale() / out.scale)
        self.register_buffer("m0", m0)
        self.register_buffer("shift", shift)
        if out.threshold is not None:
            # sparse codes in integers: real output > threshold <=> accumulator > floor(threshold / unit),
            # one integer per output channel, compared before requantization
            self.register_buffer("acc_threshold", torch.floor(out.threshold / self.acc_scale()).to(torch.int64))

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        if not self.integer:
            return self._float_forward(x, *args)
        q = x.to(torch.int64) if self.input_codes else self.quantize_input(x)
        if self.capture:
            self.last_input_codes = q
        # exact integer accumulation: float64 holds every partial sum of these products exactly
        acc = torch.round(self.linear_op((q - self.z_x).double(), self.w_centered.double(), *args)).to(torch.int64)
        acc = acc << self.bias_frac_bits
        b = self.bias_int()
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        if b is not None:
            acc = acc + b.view(shape)
        self.max_abs_acc = max(self.max_abs_acc, int(acc.abs().max().item()) if acc.numel() else 0)
        if self.out is not None:
            out = self.out
            codes = fixed_point_rescale(acc, self.m0.view(shape), self.shift.view(shape)) + out.zero_point
            codes = torch.clamp(codes, out.qmin, out.qmax)
            if out.threshold is not None:  # zero up to the threshold, at least the first level above it
                above = acc > self.acc_threshold.view(shape)
                codes = torch.where(above, codes.clamp_min(out.zero_point + 1), torch.full_like(codes, out.zero_point))
            return codes
        return (acc.double() * self.acc_scale().view(shape)).float()

    def _float_forward(self, x: Tensor, *args: Any) -> Tensor:
        """Layers without integer input or weights: float input, (integer-valued) weights, float accumulation."""
        x = x.double()
        if self.int_input:
            x = (self.quantize_input(x) - self.z_x).double() * self.s_x
        if self.int_weight:
            w = self.w_centered.double() * self.w_scale
        else:
            w = self.w_float.double()
        y = self.linear_op(x, w, *args)
        if self.bias_float is not None:
            y = y + self.bias_float.view((1, -1) + (1,) * (y.dim() - 2))
        return y.float()


class IntegerConv2d(_IntegerLayer):
    """Integer reference of a ``QuantConv2d``."""

    _conv = staticmethod(nn.functional.conv2d)

    def __init__(self, name: str, layer: QuantLayer, specs_w: WeightSpec | None, specs_in: InputSpec | None,
                 bias_frac_bits: int = 0) -> None:
        super().__init__(name, layer, specs_w, specs_in, bias_frac_bits)
        if layer.padding_mode != "zeros":
            raise LowbitError(f"layer {name}: integer path supports zero padding only, got {layer.padding_mode!r}")
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def linear_op(self, x: Tensor, w: Tensor, *args: Any) -> Tensor:
        # zero padding of centred codes is padding with the zero point, as a device pads
        return self._conv(x, w, None, self.stride, self.padding, self.dilation, self.groups)


class IntegerConv1d(IntegerConv2d):
    """Integer reference of a ``QuantConv1d``."""

    _conv = staticmethod(nn.functional.conv1d)


class IntegerConvTranspose2d(_IntegerLayer):
    """Integer reference of a ``QuantConvTranspose2d``: a transposed convolution of centred codes
    (every output is a sum of products of input and weight codes, as in a direct convolution)."""

    def __init__(self, name: str, layer: QuantLayer, specs_w: WeightSpec | None, specs_in: InputSpec | None,
                 bias_frac_bits: int = 0) -> None:
        super().__init__(name, layer, specs_w, specs_in, bias_frac_bits)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.kernel_size, self.output_padding = layer.kernel_size, layer.output_padding

    def linear_op(self, x: Tensor, w: Tensor, output_size: list[int] | None = None) -> Tensor:
        output_padding = nn.ConvTranspose2d._output_padding(self, x, output_size, self.stride, self.padding,  # type: ignore[arg-type]
                                                            self.kernel_size, 2, self.dilation)
        return nn.functional.conv_transpose2d(x, w, None, self.stride, self.padding, output_padding, self.groups,
                                              self.dilation)


class IntegerLinear(_IntegerLayer):
    """Integer reference of a ``QuantLinear``."""

    def linear_op(self, x: Tensor, w: Tensor, *args: Any) -> Tensor:
        return nn.functional.linear(x, w)


_INTEGER_LAYERS: dict[str, type[_IntegerLayer]] = {
    "conv1d": IntegerConv1d, "conv2d": IntegerConv2d, "convtranspose2d": IntegerConvTranspose2d,
    "linear": IntegerLinear,
}


class IntClamp(nn.Module):
    """ReLU / ReLU6 on integer codes: ``clamp(q, lo, hi)`` (``lo`` is the zero point)."""

    def __init__(self, lo: int, hi: int | None = None) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, q: Tensor) -> Tensor:
        return torch.clamp(q, min=self.lo, max=self.hi)


class IntegerModel(nn.Module):
    """A quantized model re-expressed with integer layers (see the module docstring).

    Attributes:
        model: the rewritten module (an ``fx.GraphModule`` when the model traces).
        layers: ``name -> IntegerConv1d | IntegerConv2d | IntegerConvTranspose2d | IntegerLinear``
            (layers with their own forward are left as they are and are not listed).
        requantized: names of layers that emit the next layers' codes by fixed-point requantization.
        traced: whether ``torch.fx`` could trace the model (without it nothing is requantized).
    """

    def __init__(self, qmodel: nn.Module, bias_frac_bits: int = 0) -> None:
        super().__init__()
        if not isinstance(bias_frac_bits, int) or not 0 <= bias_frac_bits <= 16:
            raise LowbitError(f"bias_frac_bits must be an integer from 0 to 16, got {bias_frac_bits!r}")
        require_quantized(qmodel)
        # the layers' checked specs in their ONNX form: same exportability checks (and errors) as the ONNX export
        weights, inputs = collect_specs(qmodel)
        model = copy.deepcopy(qmodel).cpu().eval()
        layers: dict[str, _IntegerLayer] = {}
        for name, layer in quant_layers(model):
            if layer.custom_forward:  # its own forward runs as in the simulation (see the module docstring)
                continue
            layers[name] = _INTEGER_LAYERS[layer.kind](name, layer, weights.get(name), inputs.get(name),
                                                       bias_frac_bits)
            set_submodule(model, name, layers[name])
        self.layers = layers
        self.requantized: list[str] = []
        self.traced = False
        try:
            graph = _LeafTracer().trace(model)
            graph_module = torch.fx.GraphModule(model, graph, type(model).__name__)
        except Exception:  # untraceable models keep every layer output in float
            graph_module = None
        if graph_module is not None:
            self.traced = True
            self.requantized = _fuse_requantization(graph_module, layers)
            model = graph_module
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        # built on the CPU; after ``.to(device)`` it runs there (inputs follow the model)
        buffer = next(self.model.buffers(), None)
        return self.model(x.to(buffer.device if buffer is not None else "cpu"))

    @property
    def integer_layers(self) -> list[str]:
        """Layers with integer accumulation (integer inputs and weights)."""
        return [n for n, l in self.layers.items() if l.integer]

    @property
    def max_abs_acc(self) -> int:
        return max((l.max_abs_acc for l in self.layers.values()), default=0)

    @property
    def fits_int32(self) -> bool:
        """Whether every accumulator seen so far fits an int32 register."""
        return self.max_abs_acc <= _ACC_LIMIT


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps integer layers opaque (their forward has data-dependent bookkeeping)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_IntegerLayer, IntClamp) + QUANT_LAYERS) or super().is_leaf_module(m, qualname)


def _same_quantizer(a: _IntegerLayer, b: _IntegerLayer) -> bool:
    return (a.s_x, a.z_x, a.qmin_x, a.qmax_x, a.threshold_x) == (b.s_x, b.z_x, b.qmin_x, b.qmax_x, b.threshold_x)


def _fuse_requantization(gm: torch.fx.GraphModule, layers: dict[str, _IntegerLayer]) -> list[str]:
    """Make integer layers emit codes where their output only reaches identical input quantizers."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused: list[str] = []
    clamp_id = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in layers or calls[node.target] != 1:
            continue
        producer = layers[node.target]
        if not producer.integer:
            continue
        chain, cur = [], node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            kind = _activation_kind(nxt, modules)
            if kind is None or nxt.args[0] is not cur:
                break
            chain.append((nxt, kind))
            cur = nxt
        consumers = list(cur.users)
        if not consumers or any(u.op == "output" for u in consumers):
            continue
        ok = all(u.op == "call_module" and u.target in layers and calls[u.target] == 1 and u.args[0] is cur
                 and len(u.args) == 1 and not u.kwargs and layers[u.target].integer for u in consumers)
        if not ok or not all(_same_quantizer(layers[consumers[0].target], layers[u.target]) for u in consumers):
            continue
        target = layers[consumers[0].target]
        if target.threshold_x is not None and (target.z_x != 0 or any(
                kind == "relu6" and target.threshold_x >= 6 for _, kind in chain)):
            continue  # the accumulator comparison needs zero-based codes and a threshold below the cap
        out = OutputCodes(target.s_x, target.z_x, target.qmin_x, target.qmax_x, target.threshold_x)
        producer.set_output_codes(out)
        for act, kind in chain:
            if kind == "pass":
                continue
            hi = None
            if kind == "relu6":
                # round(min(y, 6) / s) == min(round(y / s), round(6 / s)): rounding is monotone
                hi = out.zero_point + int(torch.round(torch.tensor(6.0) / torch.tensor(out.scale, dtype=torch.float32)))
            name = f"_lowbit_int_clamp_{clamp_id}"
            clamp_id += 1
            gm.add_submodule(name, IntClamp(out.zero_point, hi))
            with gm.graph.inserting_after(act):
                new = gm.graph.call_module(name, (act.args[0],))
            act.replace_all_uses_with(new)
            gm.graph.erase_node(act)
        for u in consumers:
            layers[u.target].input_codes = True
        fused.append(node.target)
    gm.graph.lint()
    gm.recompile()
    return fused


def _activation_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """"relu", "relu6" or "pass" for elementwise ops that commute with requantization, else None."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        if isinstance(mod, nn.ReLU6):
            return "relu6"
        if isinstance(mod, nn.ReLU):
            return "relu"
        if isinstance(mod, _PASS_MODULES):
            return "pass"
        if isinstance(mod, nn.Hardtanh) and (mod.min_val, mod.max_val) == (0.0, 6.0):
            return "relu6"
        return None
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS and len(node.args) == 1:
            return "relu"
        if node.target in _RELU6_FUNCTIONS and len(node.args) == 1:
            return "relu6"
    return None


@torch.no_grad()
def with_int32_bias(qmodel: nn.Module) -> nn.Module:
    """A copy of the simulation whose biases are rounded to the int32 grid ``s_x * s_w``, as a device
    stores them (layers with an integer input and weights only; not those with their own forward,
    which run as simulated in the integer path).

    The integer path with ``bias_frac_bits=0`` agrees with this copy up to requantization ties;
    the gap between it and the original simulation is the cost of int32 biases.
    """
    require_quantized(qmodel)
    rounded = copy.deepcopy(qmodel)
    layers = dict(quant_layers(rounded))
    for spec in layer_specs(rounded):
        layer = layers[spec.name]
        if layer.bias is None or spec.weight is None or spec.input is None or layer.custom_forward:
            continue  # (layers with their own forward keep float arithmetic in the integer path too)
        if spec.weight.kind != "uniform":
            raise LowbitError(f"layer {spec.name}: a {spec.weight.kind} weight is not on an integer grid (no int32 bias)")
        step = (spec.input.scale.double() * qspec.output_channel_scale(spec.weight, spec.out_channels).double())
        step = step.to(layer.bias.device)
        layer.bias.copy_((torch.round(layer.bias.double() / step) * step).to(layer.bias.dtype))
    return rounded


def integer_model(qmodel: nn.Module, bias_frac_bits: int = 0) -> IntegerModel:
    """The integer-only reference of a quantized model (see ``IntegerModel``)."""
    return IntegerModel(qmodel, bias_frac_bits).eval()


@torch.no_grad()
def integer_agreement(qmodel: nn.Module, images: Tensor, imodel: IntegerModel | None = None,
                      labels: Tensor | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Integer reference versus the simulation on the same images.

    Returns:
        logit differences, ``argmax_agreement`` (%), ``code_agreement`` (% of input codes of the
        integer-accumulating layers equal to the simulation's), ``max_code_diff``, the largest
        accumulator and, with ``labels``, both top-1 accuracies (%).
    """
    imodel = integer_model(qmodel) if imodel is None else imodel
    device = next(qmodel.parameters()).device
    sim_layers = dict(quant_layers(qmodel))
    specs = {s.name: s.input for s in layer_specs(qmodel)}
    watched = imodel.integer_layers
    captured: dict[str, list[Tensor]] = {n: [] for n in watched}

    def hook(name: str) -> Callable[..., None]:
        def fn(aq: nn.Module, inputs: tuple, output: Tensor) -> None:  # the simulation's codes, from the layer's spec
            captured[name].append(qspec.codes(specs[name], inputs[0].float()).to(torch.int64).cpu())
        return fn

    handles = [sim_layers[n].input_quant.register_forward_hook(hook(n)) for n in watched]
    for n in watched:
        imodel.layers[n].capture = True
    sims, ints, same, total, worst = [], [], 0, 0, 0
    was_training = qmodel.training
    qmodel.eval()
    try:
        for i in range(0, len(images), batch_size):
            xb = images[i:i + batch_size]
            sims.append(qmodel(xb.to(device)).float().cpu())
            ints.append(imodel(xb).float().cpu())
            for n in watched:
                sim_codes = captured[n].pop()
                int_codes = imodel.layers[n].last_input_codes.cpu()
                same += int((sim_codes == int_codes).sum())
                total += sim_codes.numel()
                worst = max(worst, int((sim_codes - int_codes).abs().max()) if sim_codes.numel() else 0)
    finally:
        for h in handles:
            h.remove()
        for n in watched:
            imodel.layers[n].capture = False
            imodel.layers[n].last_input_codes = None
        qmodel.train(was_training)
    sim, out = torch.cat(sims), torch.cat(ints)
    diff = (sim - out).abs()
    result: dict[str, Any] = {
        "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
        "argmax_agreement": 100.0 * (sim.argmax(1) == out.argmax(1)).float().mean().item(),
        "code_agreement": 100.0 * same / max(total, 1), "max_code_diff": worst,
        "max_abs_acc": imodel.max_abs_acc, "fits_int32": imodel.fits_int32,
        "integer_layers": len(imodel.integer_layers), "layers": len(imodel.layers),
        "requantized_layers": len(imodel.requantized),
    }
    if labels is not None:
        result["sim_top1"] = 100.0 * (sim.argmax(1) == labels).float().mean().item()
        result["integer_top1"] = 100.0 * (out.argmax(1) == labels).float().mean().item()
    return result
