"""Declarative quantizer specs: what one quantized tensor is, independent of the module that simulates it.

A ``TensorSpec`` names a code book (``kind``) and its parameters:

* ``"uniform"``: integer codes ``q`` in ``[qmin, qmax]`` of a ``bits``-wide range (signed, narrow,
  or unsigned with a zero point), real values ``(q - zero_point) * scale``; one scale and zero
  point per group of consecutive channels along ``axis``. ``group_bits`` gives each group its own
  (narrower) width, 0..16: signed 1-bit codes are the binary pair ``{-1, +1}`` times the scale
  (a whole 1-bit tensor or a 1-bit group alike), unsigned 1-bit codes the affine ``{0, 1}``, and
  width 0 is a pruned group: its codes are 0 with zero point 0, every value exactly 0. The tensor's
  ``bits`` is the storage width, ``storage_bits(group_bits)``.
* ``"sparse"``: TSQ's activation codes (``quant.sparse``): ``0`` up to ``threshold``, then the
  uniform levels of an unsigned quantizer with zero point 0.
* ``"multibit"``: DMBQ's binary basis ``sum_i alpha_i b_i`` (``b_i`` in ``{-1, +1}`` when signed,
  ``{0, 1}`` otherwise), one row of ``alphas`` per group; ``group_bits`` holds the number of bases
  of each group (0: a pruned channel, every value 0). Codes are level indices: bit ``i`` of a
  code is the state of basis ``i``.

A spec whose parameters (``scale``, ``zero_point``, ``alphas``, ``threshold``) are all None is
*declared*: the code book a quantizer is built with before calibration (``quant.declare``);
``calibrated`` tells the two apart. The functions below that need values (codes, dequantization,
value ranges) refuse a declared spec, and files hold calibrated specs only.

A ``LayerSpec`` puts a layer's weight and input specs together (``None``: that tensor stays
float). Specs are the one interface between quantized models and deployment: each quantizer
declares its spec (``spec()``), ``quant.layer_specs`` reads them off a model, exporters read
only specs, and ``to_record`` / ``from_record`` carry them through files (JSON-able metadata plus
named tensors) exactly. The functions below (codes, dequantization, ranges, bytes) are pure.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ..errors import LowbitError
from . import dmbq
from .uniform import int_range

KINDS = ("uniform", "sparse", "multibit")
MAX_BASES = dmbq.MAX_BASES  # most bases of a multibit code book
GRANULARITIES = ("tensor", "channel", "group")
TENSOR_FIELDS = ("scale", "zero_point", "alphas", "threshold")  # the numeric parameters, carried as tensors
_META_FIELDS = ("kind", "bits", "signed", "symmetric", "narrow", "granularity", "channels", "num_groups", "axis",
                "group_bits")


def storage_bits(widths: tuple[int, ...] | list[int]) -> int:
    """The code width a tensor with per-group ``widths`` is stored at: the widest group's, except that
    1-bit groups beside pruned (0-bit) ones need 2 bits (a 1-bit code has no zero level for them)."""
    top = max(widths)
    return 2 if top == 1 and min(widths) == 0 else top


def width_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """Code range of one group of width ``bits`` (0: a pruned group, the single code 0)."""
    return (0, 0) if bits == 0 else int_range(bits, signed, narrow)


def effective_groups(channels: int, granularity: str, groups: int | None) -> int:
    """Number of scale groups for a tensor with ``channels`` channels along its axis.

    Groups are consecutive channels of equal size; when ``groups`` does not divide the channel
    count, the largest divisor of ``channels`` not above ``groups`` is used.
    """
    if granularity == "tensor":
        return 1
    if granularity == "channel":
        return channels
    if granularity != "group":
        raise LowbitError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not groups or groups < 1:
        raise LowbitError("granularity 'group' needs groups >= 1")
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


def sparse_gate(x: Tensor, threshold: Tensor, step: Tensor) -> Tensor:
    """``where(x > threshold, max(x, step), 0)``: the input whose uniform codes are the sparse codes."""
    return torch.where(x > threshold, torch.maximum(x, step), torch.zeros_like(x))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)
class TensorSpec:
    """One quantized tensor's code book (see the module docstring).

    ``bits``: the code width (uniform, sparse; the widest group with ``group_bits``) or the most
    bases of any group (multibit). ``channels``: the size of the ``axis`` dimension (1 for
    per-tensor activations), split into ``num_groups`` groups of equal size.
    """

    kind: str
    bits: int
    signed: bool
    symmetric: bool = True
    narrow: bool = False
    granularity: str = "tensor"
    channels: int = 1
    num_groups: int = 1
    axis: int = 0
    group_bits: tuple[int, ...] | None = None
    scale: Tensor | None = None        # (num_groups,) float32: uniform, sparse
    zero_point: Tensor | None = None   # (num_groups,) float32 integers: uniform, sparse
    alphas: Tensor | None = None       # (num_groups, bits) float32, zero-padded: multibit
    threshold: Tensor | None = None    # (1,) float32: sparse

    def __post_init__(self) -> None:
        _check(self)

    # --- equality: exact, tensors included (dataclass eq would compare tensors elementwise)
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorSpec):
            return NotImplemented
        for f in _META_FIELDS:
            if getattr(self, f) != getattr(other, f):
                return False
        for f in TENSOR_FIELDS:
            a, b = getattr(self, f), getattr(other, f)
            if (a is None) != (b is None) or (a is not None and (a.dtype != b.dtype or not torch.equal(a, b))):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    @property
    def calibrated(self) -> bool:
        """Whether the spec holds its parameters (False: a declared code book, ``quant.declare``)."""
        return any(getattr(self, f) is not None for f in TENSOR_FIELDS)

    @property
    def binary(self) -> bool:
        """Signed 1-bit uniform codes: the pair ``{-1, +1}`` (no zero level)."""
        return self.kind == "uniform" and self.signed and self.bits == 1

    @property
    def binary_groups(self) -> tuple[bool, ...] | None:
        """Which groups hold signed 1-bit (binary) codes inside a mixed-width tensor; None without group_bits."""
        if self.kind != "uniform" or self.group_bits is None or not self.signed:
            return None
        return tuple(b == 1 for b in self.group_bits)

    @property
    def widths(self) -> tuple[int, ...]:
        """The width (bases for multibit) of every group."""
        return self.group_bits if self.group_bits is not None else (self.bits,) * self.num_groups

    @property
    def mean_bits(self) -> float:
        """Average width over the tensor's elements (every group holds as many of them)."""
        return sum(self.widths) / self.num_groups

    def to_record(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """JSON-able metadata and the numeric parameters by name; ``from_record`` inverts it exactly."""
        meta = {f: getattr(self, f) for f in _META_FIELDS}
        meta["group_bits"] = None if self.group_bits is None else list(self.group_bits)
        tensors = {f: getattr(self, f) for f in TENSOR_FIELDS if getattr(self, f) is not None}
        return meta, tensors

    @classmethod
    def from_record(cls, meta: Any, tensors: dict[str, Tensor]) -> "TensorSpec":
        """The spec of a record; LowbitError naming the field for anything that is not one."""
        if not isinstance(meta, dict) or set(meta) != set(_META_FIELDS):
            raise LowbitError(f"a tensor spec record must have exactly the keys {list(_META_FIELDS)}, got "
                              f"{sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
        extra = sorted(set(tensors) - set(TENSOR_FIELDS))
        if extra:
            raise LowbitError(f"a tensor spec record has unknown tensors {extra}")
        if not any(f in tensors for f in TENSOR_FIELDS):
            raise LowbitError("a stored tensor spec must hold its parameters (scale and zero point, alphas); "
                              "a declared, uncalibrated spec is never stored")
        values = dict(meta)
        gb = values["group_bits"]
        if gb is not None:
            if not isinstance(gb, list) or not all(_is_int(b) for b in gb):
                raise LowbitError(f"group_bits must be null or a list of integers, got {gb!r}"[:200])
            values["group_bits"] = tuple(gb)
        return cls(**values, **{f: tensors.get(f) for f in TENSOR_FIELDS})


def _bad(field: str, expected: str, value: Any) -> LowbitError:
    text = repr(value)
    return LowbitError(f"tensor spec {field} must be {expected}, got {text if len(text) <= 60 else text[:57] + '...'}")


def _tensor(spec: TensorSpec, field: str, shape: tuple[int, ...]) -> None:
    t = getattr(spec, field)
    if not isinstance(t, Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
        got = f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, Tensor) else t
        raise _bad(field, f"a float32 tensor of shape {list(shape)}", got)
    if not bool(torch.isfinite(t).all()):
        raise _bad(field, "finite", t)


def _check(spec: TensorSpec) -> None:
    """Every field of ``spec`` valid on its own and against the others (LowbitError naming the field)."""
    if spec.kind not in KINDS:
        raise _bad("kind", f"one of {KINDS}", spec.kind)
    for f in ("signed", "symmetric", "narrow"):
        if not isinstance(getattr(spec, f), bool):
            raise _bad(f, "true or false", getattr(spec, f))
    if spec.granularity not in GRANULARITIES:
        raise _bad("granularity", f"one of {GRANULARITIES}", spec.granularity)
    for f in ("channels", "num_groups"):
        if not _is_int(getattr(spec, f)) or getattr(spec, f) < 1:
            raise _bad(f, "a positive integer", getattr(spec, f))
    if not _is_int(spec.axis) or spec.axis < 0:
        raise _bad("axis", "an integer >= 0", spec.axis)
    if spec.channels % spec.num_groups:
        raise _bad("num_groups", f"a divisor of the {spec.channels} channels", spec.num_groups)
    multibit = spec.kind == "multibit"
    low, high = (0, MAX_BASES) if multibit else (1, 16)
    if not _is_int(spec.bits) or not low <= spec.bits <= high:
        raise _bad("bits", f"an integer {low}..{high}", spec.bits)
    if spec.group_bits is not None:
        gb = spec.group_bits
        if (not isinstance(gb, tuple) or len(gb) != spec.num_groups
                or not all(_is_int(b) and 0 <= b <= spec.bits for b in gb)):
            raise _bad("group_bits", f"{spec.num_groups} integers 0..{spec.bits}", gb)
        if not multibit and max(gb) == 0:
            raise _bad("group_bits", "widths with at least one unpruned group", gb)
        want = max(gb) if multibit else storage_bits(gb)
        if want != spec.bits:
            raise _bad("group_bits", f"widths whose storage width is bits ({spec.bits})", gb)
    g = spec.num_groups
    if multibit and spec.bits == 0 and spec.group_bits is None:
        raise _bad("bits", "1..4 for a multibit tensor without group_bits", 0)
    if spec.kind == "sparse" and (spec.signed or g != 1 or spec.group_bits is not None):
        raise LowbitError("a sparse tensor spec is per tensor, unsigned, with zero point 0")
    if not spec.calibrated:  # declared: the code book alone, its parameters come with calibration
        return
    if multibit:
        if spec.scale is not None or spec.zero_point is not None or spec.threshold is not None:
            raise LowbitError("a multibit tensor spec holds alphas only (no scale, zero point or threshold)")
        _tensor(spec, "alphas", (g, spec.bits))
        return
    _tensor(spec, "scale", (g,))
    _tensor(spec, "zero_point", (g,))
    if not bool((spec.scale > 0).all()):
        raise _bad("scale", "> 0", spec.scale)
    lo, hi = int_range(spec.bits, spec.signed, spec.narrow)
    zp = spec.zero_point
    if not bool(((zp == zp.round()) & (zp >= lo) & (zp <= hi)).all()):
        raise _bad("zero_point", f"integers in the code range [{lo}, {hi}]", zp)
    if spec.group_bits is not None and 0 in spec.group_bits:
        pruned = torch.tensor([b == 0 for b in spec.group_bits])
        if bool(zp[pruned].ne(0).any()):
            raise _bad("zero_point", "0 for every pruned (0-bit) group", zp)
    if spec.alphas is not None:
        raise LowbitError(f"a {spec.kind} tensor spec has no alphas")
    if spec.kind == "sparse":
        if bool(zp.ne(0).any()):
            raise LowbitError("a sparse tensor spec is per tensor, unsigned, with zero point 0")
        _tensor(spec, "threshold", (1,))
        if not bool((spec.threshold >= 0).all()):
            raise _bad("threshold", ">= 0", spec.threshold)
    elif spec.threshold is not None:
        raise LowbitError("a uniform tensor spec has no threshold")


# ------------------------------------------------------------------------------ pure functions
def _calibrated(spec: TensorSpec, what: str) -> None:
    if not spec.calibrated:
        raise LowbitError(f"{what} need a calibrated tensor spec; this {spec.kind} one is only declared "
                          f"(no scale, zero point or alphas yet)")


def channel_view(spec: TensorSpec, values: Tensor, ndim: int) -> Tensor:
    """Per-group ``values`` repeated over their channels and shaped to broadcast along ``spec.axis``."""
    shape = tuple(-1 if d == spec.axis else 1 for d in range(ndim))
    return values.repeat_interleave(spec.channels // spec.num_groups).view(shape)


def group_ranges(spec: TensorSpec) -> tuple[Tensor, Tensor]:
    """Smallest and largest code of every group (float32 tensors of ``num_groups``; uniform, sparse)."""
    if spec.kind == "multibit":
        return torch.zeros(spec.num_groups), torch.tensor([float(2 ** b - 1) for b in spec.widths])
    lo, hi = zip(*(width_range(b, spec.signed, spec.narrow) for b in spec.widths))
    return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)


def qrange(spec: TensorSpec) -> tuple[int, int]:
    """Code range of the whole tensor (its widest group)."""
    return int_range(spec.bits, spec.signed, spec.narrow)


def _limits(spec: TensorSpec, ndim: int) -> tuple[int | Tensor, int | Tensor]:
    if spec.group_bits is None:
        return qrange(spec)
    lo, hi = group_ranges(spec)
    return channel_view(spec, lo, ndim), channel_view(spec, hi, ndim)


def group_rows(spec: TensorSpec, x: Tensor) -> Tensor:
    """``x`` as ``num_groups`` rows (the ``axis`` dimension first, groups of consecutive channels)."""
    return (x.movedim(spec.axis, 0) if spec.axis else x).reshape(spec.num_groups, -1)


def ungroup_rows(spec: TensorSpec, rows: Tensor, like_shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of ``group_rows``: rows back to a tensor of ``like_shape``."""
    moved = list(like_shape)
    moved.insert(0, moved.pop(spec.axis))
    out = rows.reshape(moved)
    return out.movedim(0, spec.axis) if spec.axis else out


def gate(spec: TensorSpec, x: Tensor) -> Tensor:
    """The input whose uniform codes are ``spec``'s codes (sparse: ``where(x > t, max(x, step), 0)``)."""
    if spec.kind != "sparse":
        return x
    return sparse_gate(x, spec.threshold.to(x.device, x.dtype), spec.scale.to(x.device, x.dtype))


@torch.no_grad()
def codes(spec: TensorSpec, x: Tensor) -> Tensor:
    """Integer codes (int32, ``x``'s shape) of ``x`` under ``spec``: what a device stores.

    Uniform and sparse: ``clamp(round(x / s) + z, qmin, qmax)`` per group (binary: ``+-1`` signs),
    computed as the simulation computes them. Multibit: the index of the nearest level per group
    (pruned groups: 0).
    """
    _calibrated(spec, "codes")
    if spec.kind == "multibit":
        rows = group_rows(spec, x)
        idx = torch.zeros(rows.shape, dtype=torch.int64, device=x.device)
        for b, groups in _width_groups(spec):
            sel = torch.tensor(groups, device=x.device)
            _, i = dmbq.assign(rows[sel], spec.alphas[groups, :b].to(rows.device, rows.dtype), spec.signed)
            idx[sel] = i
        return ungroup_rows(spec, idx, x.shape).to(torch.int32)
    ndim = x.dim()
    if spec.binary:
        return torch.where(x >= 0, 1, -1).to(torch.int32)
    s = channel_view(spec, spec.scale.to(x.device), ndim)
    z = channel_view(spec, spec.zero_point.to(x.device), ndim)
    qmin, qmax = _limits(spec, ndim)
    if isinstance(qmin, Tensor):
        qmin, qmax = qmin.to(x.device), qmax.to(x.device)
    q = torch.clamp(torch.round(gate(spec, x) / s) + z, qmin, qmax).to(torch.int32)
    if spec.binary_groups is not None and any(spec.binary_groups):  # 1-bit groups of a mixed tensor: signs
        mask = channel_view(spec, torch.tensor(spec.binary_groups, device=x.device), ndim)
        q = torch.where(mask, torch.where(x >= 0, 1, -1).to(torch.int32), q)
    return q


def _width_groups(spec: TensorSpec) -> list[tuple[int, list[int]]]:
    """``(bases, group indices)`` for every width of a multibit spec present (pruned groups left out)."""
    out: dict[int, list[int]] = {}
    for g, b in enumerate(spec.widths):
        if b:
            out.setdefault(b, []).append(g)
    return sorted(out.items())


def levels(spec: TensorSpec) -> Tensor:
    """Multibit: every group's levels ``(num_groups, 2^bits)`` in code order (unused and pruned: 0).

    Each width's levels are computed from its own alphas, as the DMBQ quantizers compute them.
    """
    _calibrated(spec, "levels")
    if spec.kind != "multibit":
        raise LowbitError(f"a {spec.kind} tensor spec has no level table")
    out = torch.zeros(spec.num_groups, 2 ** spec.bits, dtype=spec.alphas.dtype)
    for b, groups in _width_groups(spec):
        out[groups, :2 ** b] = dmbq.levels(spec.alphas[groups, :b], spec.signed)
    return out


@torch.no_grad()
def dequantize(spec: TensorSpec, q: Tensor) -> Tensor:
    """Real values (float32) of integer codes ``q`` (a weight- or activation-shaped tensor)."""
    _calibrated(spec, "real values")
    if spec.kind == "multibit":
        rows = group_rows(spec, q.to(torch.int64))
        lv = levels(spec).to(q.device)
        return ungroup_rows(spec, lv.gather(1, rows), q.shape).float()
    s = channel_view(spec, spec.scale.to(q.device), q.dim())
    if spec.binary:
        return q.float() * s
    return (q.float() - channel_view(spec, spec.zero_point.to(q.device), q.dim())) * s


def fake_quantize(spec: TensorSpec, x: Tensor) -> Tensor:
    """Quantize-dequantize ``x`` under ``spec`` (no gradients): what the simulation computes."""
    return dequantize(spec, codes(spec, x)).to(x.dtype)


def bit_planes(spec: TensorSpec, q: Tensor) -> Tensor:
    """Multibit: the basis states of codes ``q`` as ``(bits, num_groups, n)`` int8 planes, ``+-1`` (signed)
    or ``0/1``; planes beyond a group's own bases (and every plane of a pruned group) are 0."""
    rows = group_rows(spec, q.to(torch.int64))
    planes = torch.zeros(spec.bits, *rows.shape, dtype=torch.int8, device=q.device)
    for b, groups in _width_groups(spec):
        planes[:b, groups] = dmbq.planes_of(rows[groups], b, spec.signed).to(torch.int8)
    return planes


def value_range(spec: TensorSpec) -> tuple[Tensor, Tensor]:
    """Smallest and largest real value of every group (float32 tensors of ``num_groups``)."""
    _calibrated(spec, "value ranges")
    if spec.kind == "multibit":
        lv = levels(spec)
        return lv.amin(1), lv.amax(1)
    lo, hi = group_ranges(spec)
    if spec.binary:
        return -spec.scale, spec.scale.clone()
    # a binary group's range [-1, 1] holds its two codes; pruned groups: [0, 0] with zero point 0
    return (lo - spec.zero_point) * spec.scale, (hi - spec.zero_point) * spec.scale


def output_channel_scale(spec: TensorSpec, out_channels: int) -> Tensor:
    """The scale of every output channel (group scales repeated, ConvTranspose scales tiled over its
    conv groups): the unit of a uniform weight's int32 bias."""
    _calibrated(spec, "output channel scales")
    per_axis = spec.scale.repeat_interleave(spec.channels // spec.num_groups)
    return per_axis.repeat(out_channels // spec.channels)


def nbytes(spec: TensorSpec, numel: int) -> int:
    """Bytes a tensor of ``numel`` elements takes as stored: codes at their width (byte-aligned per
    tensor) plus parameters at 32 bit (scales, zero points when asymmetric, alphas, threshold).

    Per-group widths (``group_bits``) are stored densely, as the artifact (version 5) writes them:
    each group's codes at its own width, one byte-aligned run per width present, pruned (0-bit)
    groups no codes; every group keeps its scale (a pruned group's is the unit of its integer
    bias), only unpruned groups a zero point (a pruned group's is 0 by definition).
    """
    if spec.kind == "multibit":
        per_group = numel // spec.num_groups
        total = sum(spec.widths)
        return (per_group * total + 7) // 8 + 4 * total
    if spec.channels == 1 and numel == 0:  # an activation: its parameters only
        return 8 + (4 if spec.kind == "sparse" else 0)
    if spec.group_bits is None:
        return (numel * spec.bits + 7) // 8 + spec.num_groups * 4 * (1 if spec.symmetric else 2)
    per_group = numel // spec.num_groups
    codes = sum((per_group * spec.group_bits.count(b) * b + 7) // 8 for b in set(spec.group_bits) if b)
    zero_points = 0 if spec.symmetric else sum(b > 0 for b in spec.group_bits)
    return codes + 4 * (spec.num_groups + zero_points)


def pruned_channels(spec: TensorSpec) -> int:
    """Channels along ``axis`` stored at 0 bits (multibit groups without bases: every value 0, no bytes)."""
    return sum(b == 0 for b in spec.widths) * (spec.channels // spec.num_groups)


# ------------------------------------------------------------------------------ layers
@dataclass(frozen=True, eq=False)
class LayerSpec:
    """One quantized layer: its name, kind (``quant.layers.LAYER_KINDS``), role and weight shape,
    the specs of its weight and input (``None``: that tensor stays float)."""

    name: str
    kind: str
    role: str
    weight_shape: tuple[int, ...]
    out_channels: int
    weight: TensorSpec | None
    input: TensorSpec | None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerSpec):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self))

    __hash__ = None  # type: ignore[assignment]

    def to_record(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """JSON-able metadata and tensors (``weight.scale``, ``input.threshold``, ...); exact inverse: from_record."""
        meta: dict[str, Any] = {"name": self.name, "kind": self.kind, "role": self.role,
                                "weight_shape": list(self.weight_shape), "out_channels": self.out_channels}
        tensors: dict[str, Tensor] = {}
        for part in ("weight", "input"):
            spec = getattr(self, part)
            if spec is None:
                meta[part] = None
                continue
            meta[part], ts = spec.to_record()
            tensors.update({f"{part}.{k}": v for k, v in ts.items()})
        return meta, tensors

    @classmethod
    def from_record(cls, meta: Any, tensors: dict[str, Tensor]) -> "LayerSpec":
        keys = {"name", "kind", "role", "weight_shape", "out_channels", "weight", "input"}
        if not isinstance(meta, dict) or set(meta) != keys:
            raise LowbitError(f"a layer spec record must have exactly the keys {sorted(keys)}")
        parts = {}
        for part in ("weight", "input"):
            mine = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(f"{part}.")}
            parts[part] = None if meta[part] is None else TensorSpec.from_record(meta[part], mine)
        shape = meta["weight_shape"]
        if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
            raise LowbitError(f"weight_shape must be a list of positive integers, got {shape!r}"[:200])
        for key in ("name", "kind", "role"):
            if not isinstance(meta[key], str) or not meta[key]:
                raise LowbitError(f"a layer spec's {key} must be a non-empty string, got {meta[key]!r}"[:200])
        if not _is_int(meta["out_channels"]) or meta["out_channels"] < 1:
            raise LowbitError(f"a layer spec's out_channels must be a positive integer, got {meta['out_channels']!r}"[:200])
        return cls(meta["name"], meta["kind"], meta["role"], tuple(shape), meta["out_channels"], parts["weight"],
                   parts["input"])
