"""The bridge between quantized models and specs: read every layer's ``LayerSpec`` off a model, and
build a layer's quantizers back from one.

``layer_specs`` is the one interface deployment code reads (artifact, ONNX, integer path, multi-bit
export); ``quantized_layer`` builds a layer's quantizers from its spec, declared (``quant.declare``:
``lowbit.quantize`` / ``lowbit.qat`` through ``graph.surgery.prepare``) or calibrated (``lowbit.load``),
through the two factories ``weight_quantizer`` and ``input_quantizer``. A QAT method's trainable
quantizers come from the code books it declares (``quant.declare``: multibit, sparse, a settled uniform
input) through ``training_weight_quantizer`` / ``training_input_quantizer``: a trainer registered per
part and spec kind (``register_trainer``; the first one of a kind is its default) wraps the layer's
plain quantizer. Only this module (and the quantizers' own ``spec()`` methods) knows which quantizer
class implements which code book.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import LowbitError
from .dmbq_quantizers import DmbqAct, DmbqWeight
from .layers import layer_kind, out_channels, quant_layers, quantize_layer
from .learnable import LearnedStepAct, LearnedStepWeight
from .quantizer import ActQuantizer, WeightQuantizer
from .sparse import SparseActQuantizer, SparseStepAct
from .spec import KINDS, LayerSpec, TensorSpec, channel_view, codes, dequantize, fake_quantize, qrange


def _spec_of(name: str, quantizer: nn.Module, what: str) -> TensorSpec:
    make = getattr(quantizer, "spec", None)
    if make is None:
        raise LowbitError(f"layer {name}: its {what} quantizer {type(quantizer).__name__} declares no spec "
                          "(a training stand-in: finish the run, or a quantizer lowbit cannot export)")
    try:
        return make()
    except LowbitError as exc:
        raise LowbitError(f"layer {name}: {exc}") from None


@torch.no_grad()
def layer_spec(name: str, layer: nn.Module, verify: bool = False) -> LayerSpec:
    """The spec of one quantized layer; with ``verify``, LowbitError unless its quantizers compute
    exactly what their specs say (a subclass may declare a spec its forward does not follow)."""
    wq, aq = layer.weight_quant, layer.input_quant
    # a training stand-in (LSQ, TSQ step 1) has no ``enabled``: it is on, and _spec_of names it
    weight = _spec_of(name, wq, "weight") if getattr(wq, "enabled", True) else None
    inp = _spec_of(name, aq, "input") if getattr(aq, "enabled", True) else None
    if verify and weight is not None:
        _verify_weight(name, layer, weight)
    if verify and inp is not None:
        _verify_input(name, aq, inp)
    return LayerSpec(name, layer.kind, layer.role, tuple(layer.weight.shape), out_channels(layer), weight, inp)


def layer_specs(qmodel: nn.Module, verify: bool = False) -> list[LayerSpec]:
    """``LayerSpec`` of every quantized layer of ``qmodel``, in module order (see ``layer_spec``)."""
    return [layer_spec(name, layer, verify) for name, layer in quant_layers(qmodel)]


def code_books(qmodel: nn.Module) -> set[str]:
    """The code book kinds (``quant.spec.KINDS``) the quantizers of ``qmodel`` declare (``CODE_BOOK``),
    committed or not: which exporter a model needs."""
    return {m.CODE_BOOK for m in qmodel.modules() if isinstance(getattr(m, "CODE_BOOK", None), str)}


def _verify_weight(name: str, layer: nn.Module, spec: TensorSpec) -> None:
    """The quantizer's simulated weight must be the spec's dequantized codes of the layer's weight."""
    w = layer.weight.detach()
    simulated = layer.weight_quant(w).float().cpu()
    rebuilt = dequantize(spec, codes(spec, w.float().cpu()))
    if spec.kind == "multibit":
        tol = 1e-6 * (spec.alphas.abs().sum(1).max().item() if spec.alphas.numel() else 0.0)
        ok = bool(((rebuilt - simulated).abs() <= tol).all())
    else:
        s = channel_view(spec, spec.scale, w.dim()).abs().expand_as(simulated)
        ok = bool(((rebuilt - simulated).abs() <= 1e-4 * s).all())
    if not ok:
        what = "multi-bit" if spec.kind == "multibit" else f"uniform {spec.bits}-bit"
        raise LowbitError(f"layer {name}: weight quantizer {type(layer.weight_quant).__name__} does not produce "
                          f"{what} codes; it has no integer ONNX equivalent")


def _verify_input(name: str, aq: nn.Module, spec: TensorSpec) -> None:
    """The quantizer's function must be the spec's on a fine probe around its code range (and threshold)."""
    if spec.kind == "multibit":
        lo, hi = spec.alphas.abs().sum().neg().item(), spec.alphas.abs().sum().item()
        probe = torch.linspace(lo - 1, hi + 1, 1001)
        scale = max(hi, 1e-8)
    else:
        scale, zero = spec.scale.item(), spec.zero_point.item()
        qmin, qmax = qrange(spec)
        probe = torch.linspace((qmin - zero - 3) * scale, (qmax - zero + 3) * scale, 1001)
        if spec.kind == "sparse":  # the threshold region must be probed finely: the gate is part of what is checked
            t = spec.threshold.item()
            probe = torch.cat([probe, torch.linspace(t - scale, t + scale, 201), spec.threshold])
    expected = fake_quantize(spec, probe)
    device = next((b.device for b in aq.buffers()), torch.device("cpu"))
    try:
        got = aq(probe.to(device)).cpu()
    except Exception as exc:  # any failure here means "not exportable"
        raise LowbitError(f"layer {name}: input quantizer cannot be evaluated for export ({exc})") from None
    if not torch.allclose(got.float(), expected, atol=1e-5 * scale, rtol=0):
        raise LowbitError(f"layer {name}: input quantizer {type(aq).__name__} is not uniform affine "
                          f"quantization; it has no ONNX QuantizeLinear equivalent")


# ------------------------------------------------------------------------------ building from specs
def _declared_only_uniform(spec: TensorSpec) -> None:
    if spec.kind == "multibit" and not spec.calibrated:
        raise LowbitError("a declared multibit spec has no plain quantizer: DMBQ (lowbit.qat method 'dmbq') trains "
                          "its alphas (training_weight_quantizer / training_input_quantizer over the layer's uniform "
                          "quantizer); build from a committed spec")


def weight_quantizer(spec: TensorSpec, device: torch.device | str = "cpu") -> nn.Module:
    """The (enabled) weight quantizer that implements ``spec``: committed to the spec's parameters
    when it is calibrated, fresh (scales 1, zero points 0: nothing calibrated yet) when it is only
    declared (``quant.declare``)."""
    _declared_only_uniform(spec)
    if spec.kind == "multibit":
        base = WeightQuantizer(1, spec.channels, "channel", axis=spec.axis).to(device)
        q = DmbqWeight(base, 0)
        q.channel_bits.copy_(torch.tensor(spec.widths, dtype=torch.int64))
        q.alpha.zero_()
        q.alpha[:, :spec.bits] = spec.alphas.to(q.alpha.device)
        q.frozen = True
        return q
    if spec.kind != "uniform":
        raise LowbitError(f"a {spec.kind} spec does not describe weights")
    wq = WeightQuantizer(spec.bits, spec.channels, spec.granularity,
                         spec.num_groups if spec.granularity == "group" else None, spec.symmetric, spec.narrow,
                         axis=spec.axis).to(device)
    if wq.num_groups != spec.num_groups:
        raise LowbitError(f"{spec.num_groups} scale groups do not fit {spec.channels} channels at "
                          f"granularity {spec.granularity!r}")
    if wq.signed != spec.signed:
        raise LowbitError(f"uniform weights are signed exactly when symmetric; the spec says signed={spec.signed}, "
                          f"symmetric={spec.symmetric}")
    if spec.group_bits is not None:
        wq.set_group_bits(spec.group_bits)
    if spec.calibrated:
        wq.scale.copy_(spec.scale)
        wq.zero_point.copy_(spec.zero_point)
    return wq


def input_quantizer(spec: TensorSpec, device: torch.device | str = "cpu", symmetric: bool | None = None) -> nn.Module:
    """The (enabled) input quantizer that implements ``spec``, calibrated as the spec says, or fresh
    (scale 1, zero point 0, threshold 0) for a declared spec. ``symmetric`` (default: the spec's) is
    the calibration setting of a uniform one (signed codes for negative inputs), not part of its codes."""
    _declared_only_uniform(spec)
    if spec.kind == "multibit":
        act = DmbqAct(ActQuantizer(spec.bits).to(device), spec.bits, spec.signed)
        act.alpha.copy_(spec.alphas)
        act.initialized.fill_(True)
        act.frozen = True
        return act
    if spec.num_groups != 1 or spec.group_bits is not None:
        raise LowbitError(f"an input quantizer has one scale for the tensor; the spec has {spec.num_groups} groups"
                          + (" and per-group widths" if spec.group_bits is not None else ""))
    symmetric = spec.symmetric if symmetric is None else symmetric
    aq = (SparseActQuantizer(spec.bits) if spec.kind == "sparse" else ActQuantizer(spec.bits, symmetric)).to(device)
    aq.signed = spec.signed
    if spec.calibrated:
        aq.scale.copy_(spec.scale)
        aq.zero_point.copy_(spec.zero_point)
        if spec.kind == "sparse":
            aq.threshold.copy_(spec.threshold)
    return aq


def _check_fits(layer: nn.Module, spec: LayerSpec) -> None:
    """``spec`` must describe ``layer`` (a float layer of a lowbit kind, or its quantized twin)."""
    kind = layer_kind(layer)
    ws = spec.weight
    if (kind is None or spec.kind != kind.name or tuple(layer.weight.shape) != spec.weight_shape
            or spec.out_channels != out_channels(layer)
            or (ws is not None and (ws.axis, ws.channels) != (kind.axis, layer.weight.shape[kind.axis]))):
        what = kind.name if kind is not None else type(layer).__name__
        raise LowbitError(f"layer {spec.name!r}: the spec describes another layer than the model's {what} "
                          f"of weight {list(layer.weight.shape)} (kind {spec.kind}, weight {list(spec.weight_shape)}, "
                          f"{spec.out_channels} outputs" + (f", {ws.channels} channels on axis {ws.axis})" if ws else ")"))


def quantized_layer(layer: nn.Module, spec: LayerSpec, standby: LayerSpec, a_symmetric: bool) -> nn.Module:
    """The quantized twin of the float ``layer`` (``quant.layers.quantize_layer``) with the quantizers ``spec``
    describes, declared (``graph.surgery.prepare``) or calibrated (``lowbit.load``), and ``spec``'s role.

    A float part (None in ``spec``) gets the quantizer ``standby`` declares, switched off
    (``quant.declare.standby``: the config's uniform widths); an input ``standby`` leaves float too
    (a weight-only config) gets an activation quantizer without a width. ``a_symmetric`` is the
    config's calibration setting of uniform inputs. The weight values are the caller's.
    """
    _check_fits(layer, spec)
    device = layer.weight.device
    if spec.weight is not None:
        wq = weight_quantizer(spec.weight, device)
    else:
        wq = weight_quantizer(standby.weight, device)
        wq.enabled = False
    if spec.input is not None:
        aq = input_quantizer(spec.input, device, a_symmetric)
    else:
        part = standby.input
        aq = ActQuantizer(None, a_symmetric).to(device) if part is None else input_quantizer(part, device, a_symmetric)
        aq.enabled = False
    new = quantize_layer(layer, wq, aq)
    new.role = spec.role
    return new


# ------------------------------------------------------------------------------ trainable quantizers
# builder(spec, base, **settings) -> the trainable quantizer of the declared code book ``spec`` over the
# layer's plain quantizer ``base``; by (part, spec kind), then trainer name (the first registered: the default)
Trainer = Callable[..., nn.Module]
_TRAINERS: dict[tuple[str, str], dict[str, Trainer]] = {}
PARTS = ("weight", "input")


def register_trainer(part: str, kind: str, name: str) -> Callable[[Trainer], Trainer]:
    """Register a trainable quantizer for ``part`` ("weight" or "input") code books of ``kind`` under ``name``
    (a decorator). ``builder(spec, base, **settings)`` gets the declared spec and the layer's plain quantizer
    (checked to fit the spec, ``_check_base``) and returns the module that trains in its place; its
    ``commit`` gives the plain quantizer back (``quant.learnable.commit_stand_ins``)."""
    if part not in PARTS or kind not in KINDS:
        raise LowbitError(f"a trainer is registered for a part in {PARTS} and a kind in {KINDS}, got {part!r}, "
                          f"{kind!r}")

    def add(builder: Trainer) -> Trainer:
        _TRAINERS.setdefault((part, kind), {})[name] = builder
        return builder
    return add


def trainers(part: str, kind: str) -> list[str]:
    """Names of the trainers registered for ``part`` code books of ``kind`` (the default first)."""
    return list(_TRAINERS.get((part, kind), {}))


def _check_base(part: str, spec: TensorSpec, base: nn.Module) -> None:
    """``base`` must be the enabled plain quantizer that a trainer of ``spec`` wraps: the same uniform or
    sparse code book (calibration state aside), or for multibit the uniform one with its geometry and width."""
    plain = WeightQuantizer if part == "weight" else ActQuantizer
    if not isinstance(base, plain) or not base.enabled:
        state = "a disabled " if isinstance(base, plain) else ""
        raise LowbitError(f"a trainable {part} quantizer wraps the layer's enabled {plain.__name__}, got "
                          f"{state}{type(base).__name__}")
    if spec.kind == "multibit":
        want = (spec.bits, spec.channels, spec.axis) if part == "weight" else (spec.bits,)
        have = (base.bits, base.channels, base.axis) if part == "weight" else (base.bits,)
        if want != have:
            what = "width, channels and axis" if part == "weight" else "width"
            raise LowbitError(f"the multibit {part} spec's {what} {want} do not fit the layer's quantizer ({have})")
        return
    have = base.spec().to_record()[0]
    if have != spec.to_record()[0]:
        diff = {k: (v, have[k]) for k, v in spec.to_record()[0].items() if have[k] != v}
        raise LowbitError(f"the declared {spec.kind} {part} code book differs from the layer's quantizer in "
                          f"{sorted(diff)} (declared, held: {diff})"[:300])


def _training_quantizer(part: str, spec: TensorSpec, base: nn.Module, trainer: str | None,
                        settings: dict[str, Any]) -> nn.Module:
    if not isinstance(spec, TensorSpec):
        raise LowbitError(f"a trainable {part} quantizer is built from a declared tensor spec, got "
                          f"{type(spec).__name__}")
    if spec.calibrated:
        raise LowbitError(f"a trainable {part} quantizer is built from a declared spec (quant.declare), not a "
                          "calibrated one: its parameters are what it learns")
    known = _TRAINERS.get((part, spec.kind), {})
    if not known or (trainer is not None and trainer not in known):
        name = f" {trainer!r}" if trainer is not None else ""
        raise LowbitError(f"no trainer{name} for {spec.kind} {part} code books"
                          + (f"; known: {', '.join(known)}" if known else ""))
    _check_base(part, spec, base)
    return known[trainer or next(iter(known))](spec, base, **settings)


def training_weight_quantizer(spec: TensorSpec, base: nn.Module, trainer: str | None = None,
                             **settings: Any) -> nn.Module:
    """The trainable weight quantizer of the declared code book ``spec`` over the layer's plain ``base``
    (built from its uniform declaration), by the trainer registered for ``spec.kind`` (``trainer``: by name)."""
    return _training_quantizer("weight", spec, base, trainer, settings)


def training_input_quantizer(spec: TensorSpec, base: nn.Module, trainer: str | None = None,
                            **settings: Any) -> nn.Module:
    """The trainable input quantizer of the declared code book ``spec`` over the layer's plain ``base``
    (a sparse code book: the ``SparseActQuantizer`` ``input_quantizer`` built from it, calibrated)."""
    return _training_quantizer("input", spec, base, trainer, settings)


@register_trainer("weight", "uniform", "lsq")
def _lsq_weight(spec: TensorSpec, base: WeightQuantizer, weight: Tensor, lsq_grad_scale: bool = True) -> nn.Module:
    """Learned step sizes (LSQ) on the uniform grid: ``weight`` sets the gradient scale ``1 / sqrt(n Q_P)``."""
    return LearnedStepWeight(base, weight, lsq_grad_scale)


@register_trainer("input", "uniform", "lsq")
def _lsq_input(spec: TensorSpec, base: ActQuantizer, lsq_grad_scale: bool = True) -> nn.Module:
    return LearnedStepAct(base, lsq_grad_scale=lsq_grad_scale)


@register_trainer("weight", "multibit", "dmbq")
def _dmbq_weight(spec: TensorSpec, base: WeightQuantizer, solver: str = "auto") -> nn.Module:
    """DMBQ's per-channel binary bases, as many per channel as the spec's ``group_bits``."""
    q = DmbqWeight(base, spec.bits, solver)
    q.channel_bits.copy_(torch.tensor(spec.widths, dtype=torch.int64))
    return q


@register_trainer("input", "multibit", "dmbq")
def _dmbq_input(spec: TensorSpec, base: ActQuantizer, solver: str = "auto", momentum: float = 0.9) -> nn.Module:
    return DmbqAct(base, spec.bits, spec.signed, solver, momentum)


@register_trainer("input", "sparse", "tsq")
def _sparse_input(spec: TensorSpec, base: SparseActQuantizer, sparsity: float = 0.0, momentum: float = 0.99,
                  track: bool = True, floor: float = 0.0) -> nn.Module:
    """TSQ's step 1: a learned step and a tracked threshold over the calibrated ``SparseActQuantizer``."""
    return SparseStepAct(base, sparsity, momentum, track, floor)
