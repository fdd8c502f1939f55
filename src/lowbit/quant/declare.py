"""Declared specs: every layer's code books, decided from the config and its resolved widths before any
quantizer exists.

``graph.surgery.prepare`` resolves each layer's widths (``lowbit.layer_bits``: the config's uniform
widths, the first/last-layer protocol and the user's map), declares each layer's ``LayerSpec`` here,
and builds every quantizer once from it (``quant.layer_specs.quantized_layer``), through the same
factories ``lowbit.load`` builds stored specs with. The functions below are pure: a layer's kind and
weight shape, the config and its ``LayerBits`` in, a ``LayerSpec`` out.

Design:

* **A declared spec is a ``TensorSpec`` without parameters.** Its code-book fields (kind, bits,
  signedness, symmetric/narrow codes, granularity, channels, groups, axis, per-group widths) are
  set; ``scale``, ``zero_point``, ``alphas`` and ``threshold`` are all None (``spec.calibrated`` is
  False). One class keeps one validation (``quant.spec``): a declaration that no quantizer could
  implement (an unknown kind, per-channel widths that do not match the channels, a zero width for
  the whole tensor) is a LowbitError here, before anything is built. Calibration fills the
  parameters in; the quantizers' ``spec()`` then returns the calibrated spec, whose code-book
  fields are the declared ones (``layer_specs()`` of a freshly prepared model equals the
  declaration in them). Files hold calibrated specs only (``TensorSpec.from_record`` refuses one
  without parameters).
* **An input's signedness is settled by calibration.** A uniform input is declared unsigned
  (``signed=False, symmetric=False``, as an uncalibrated quantizer reports itself); the config's
  ``a_symmetric`` (signed symmetric codes for inputs that go negative) is a calibration setting
  the factory takes beside the spec (``input_quantizer(spec, symmetric=...)``), as it always has
  been, not a code-book field.
* **A float part is None**, as in every ``LayerSpec``. The layer still carries a quantizer there,
  switched off: the one the config's uniform widths declare for the layer
  (``graph.surgery.wrap_layer``), so that methods that switch a part on later
  (``lowbit.sensitivity``, ``ptq.common.quantizers_disabled``) and state dicts see the same modules
  whatever the map says.
* Declaration needs the call order (roles: first / last / unused) but no quantizer: prepare takes
  the order from hooks on the float layers (``graph.surgery.execution_order``), then declares,
  then wraps.

* **A QAT method re-declares what it trains.** Its setup turns a layer's declared uniform parts into
  the code books it trains (``multibit_weight`` / ``multibit_input``: DMBQ's binary basis with as
  many bases as the uniform width; ``sparse_input``: TSQ's threshold codes; ``settled_input``: a
  uniform input with the sign calibration settled, which LSQ-style learned steps train), stores
  them in the model's record (``QuantRecord.declared``), and builds the trainable quantizers from
  them through one factory (``quant.layer_specs.training_weight_quantizer`` /
  ``training_input_quantizer``, keyed on the spec's kind). A later method adds a kind and its
  trainer there, not a rewrite. The finished model's ``layer_specs()`` has the re-declared code
  books, except what a method reallocates while it trains (DMBQ's LBA: the bases per channel).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LowbitError
from ..layer_bits import LayerBits
from .dmbq import MAX_BASES
from .layers import LAYER_KINDS, LayerKind
from .spec import LayerSpec, TensorSpec, effective_groups

if TYPE_CHECKING:
    from ..config import QuantConfig


def declare_weight(kind: LayerKind, weight_shape: tuple[int, ...], cfg: QuantConfig, bits: LayerBits) -> TensorSpec | None:
    """The uniform weight code book of a ``kind`` layer of ``weight_shape`` at ``bits`` (None: float weights).

    Scales are per the config's granularity, one per output channel along the kind's axis, or per
    group of channels; per-channel widths (``bits.channel_bits``) need per-channel scales, so they
    make the granularity ``"channel"`` whatever the config says (unless its groups already are the
    channels). Codes are signed symmetric (narrow or not) or unsigned with a zero point, as the
    config's ``w_symmetric`` / ``w_narrow`` say.
    """
    if bits.w_bits is None:
        return None
    channels = weight_shape[kind.axis]
    granularity, groups = cfg.granularity, cfg.groups
    num_groups = effective_groups(channels, granularity, groups)
    if bits.channel_bits is not None and num_groups != channels:
        granularity, num_groups = "channel", channels
    if bits.channel_bits is not None and len(bits.channel_bits) != channels:
        raise LowbitError(f"per-channel widths give {len(bits.channel_bits)} channels, the {kind.name} weight of "
                          f"shape {list(weight_shape)} has {channels} along axis {kind.axis}")
    return TensorSpec("uniform", bits.w_bits, cfg.w_symmetric, cfg.w_symmetric, cfg.w_narrow, granularity,
                      channels, num_groups, kind.axis, bits.channel_bits)


def declare_input(bits: LayerBits) -> TensorSpec | None:
    """The uniform input code book at ``bits.a_bits`` (None: a float input): per tensor, unsigned until
    calibration sees negative inputs (see the module docstring)."""
    if bits.a_bits is None:
        return None
    return TensorSpec("uniform", bits.a_bits, False, False, False)


def declare_layer(name: str, kind: str, role: str, weight_shape: tuple[int, ...], out_channels: int,
                  cfg: QuantConfig, bits: LayerBits) -> LayerSpec:
    """The declared ``LayerSpec`` of one layer: its weight and input code books at its resolved widths.

    Raises:
        LowbitError: an unknown layer kind, or widths no quantizer implements (naming the layer).
    """
    if kind not in LAYER_KINDS:
        raise LowbitError(f"layer {name!r}: kind {kind!r} is not one lowbit quantizes ({', '.join(LAYER_KINDS)})")
    layer_kind = LAYER_KINDS[kind]
    if len(weight_shape) != layer_kind.spatial + 2:
        raise LowbitError(f"layer {name!r}: a {kind} weight has {layer_kind.spatial + 2} dimensions, got "
                          f"{list(weight_shape)}")
    try:
        weight = declare_weight(layer_kind, tuple(weight_shape), cfg, bits)
        inp = declare_input(bits)
    except LowbitError as exc:
        raise LowbitError(f"layer {name!r}: {exc}") from None
    return LayerSpec(name, kind, role, tuple(weight_shape), out_channels, weight, inp)


def per_channel(spec: TensorSpec) -> TensorSpec:
    """The declared uniform code book of ``spec`` with one scale per channel (each group's width repeated
    over its channels): what a layer's weights become when per-channel factors (BN folding) join its scales."""
    if spec.kind != "uniform":
        raise LowbitError(f"only uniform weights take per-channel scales this way, not {spec.kind} ones")
    rep = spec.channels // spec.num_groups
    widths = None if spec.group_bits is None else tuple(b for b in spec.group_bits for _ in range(rep))
    return TensorSpec("uniform", spec.bits, spec.signed, spec.symmetric, spec.narrow, "channel", spec.channels,
                      spec.channels, spec.axis, widths)


# ------------------------------------------------------------------------------ what QAT methods train
def _declared_uniform(spec: TensorSpec | None, what: str) -> TensorSpec:
    """``spec`` itself: a declared (uncalibrated) uniform code book, else LowbitError naming ``what``."""
    if not isinstance(spec, TensorSpec):
        raise LowbitError(f"{what} needs a declared tensor spec, got {type(spec).__name__} (a float part has none)")
    if spec.kind != "uniform" or spec.calibrated:
        state = "calibrated" if spec.calibrated else "declared"
        raise LowbitError(f"{what} starts from a declared uniform code book, got a {state} {spec.kind} one")
    return spec


def _one_input(spec: TensorSpec, what: str) -> None:
    if spec.num_groups != 1 or spec.group_bits is not None:
        raise LowbitError(f"{what}: an input has one code range for the tensor; the spec has {spec.num_groups} "
                          "groups" + (" and per-group widths" if spec.group_bits is not None else ""))


def multibit_weight(spec: TensorSpec | None) -> TensorSpec:
    """DMBQ's weight code book for the declared uniform weight ``spec``: a binary basis ``sum_i alpha_i b_i``,
    ``b_i`` in ``{-1, +1}``, per output channel (whatever the uniform granularity), with as many bases as
    ``spec`` has bits in every channel (``group_bits``; LBA changes them while it trains)."""
    spec = _declared_uniform(spec, "a multi-bit weight")
    if spec.group_bits is not None:
        raise LowbitError("a multi-bit weight takes its bases per channel from its own width (or LBA's budget), "
                          f"not from per-channel uniform widths ({spec.group_bits[:8]}...)"[:200])
    if spec.bits > MAX_BASES:
        raise LowbitError(f"a multi-bit weight has 1 to {MAX_BASES} bases, the uniform width is {spec.bits}")
    return TensorSpec("multibit", spec.bits, True, True, False, "channel", spec.channels, spec.channels, spec.axis,
                      (spec.bits,) * spec.channels)


def multibit_input(spec: TensorSpec | None, signed: bool) -> TensorSpec:
    """DMBQ's input code book for the declared uniform input ``spec``: one binary basis for the tensor with as
    many bases as ``spec`` has bits, ``b_i`` in ``{-1, +1}`` (``signed``: inputs that go negative) or ``{0, 1}``."""
    spec = _declared_uniform(spec, "a multi-bit input")
    _one_input(spec, "a multi-bit input")
    if spec.bits > MAX_BASES:
        raise LowbitError(f"a multi-bit input has 1 to {MAX_BASES} bases, the uniform width is {spec.bits}")
    if not isinstance(signed, bool):
        raise LowbitError(f"a multi-bit input's signed must be true or false, got {signed!r}")
    return TensorSpec("multibit", spec.bits, signed)


def sparse_input(spec: TensorSpec | None) -> TensorSpec:
    """TSQ's input code book for the declared uniform input ``spec``: 0 up to a threshold, then the uniform
    levels of an unsigned quantizer with zero point 0 (``quant.sparse``), at ``spec``'s width."""
    spec = _declared_uniform(spec, "a sparse input")
    _one_input(spec, "a sparse input")
    if spec.signed:
        raise LowbitError("a sparse input is unsigned (non-negative inputs); the declared input is signed")
    return TensorSpec("sparse", spec.bits, False, False, False)


def settled_input(spec: TensorSpec | None, signed: bool) -> TensorSpec:
    """The declared uniform input ``spec`` with its sign as calibration settled it (``signed``: symmetric
    codes for an input that goes negative, ``ActQuantizer.set_range``): the code book a learned step trains."""
    spec = _declared_uniform(spec, "a uniform input")
    _one_input(spec, "a uniform input")
    if not isinstance(signed, bool):
        raise LowbitError(f"a uniform input's signed must be true or false, got {signed!r}")
    return TensorSpec("uniform", spec.bits, signed, signed, False)
