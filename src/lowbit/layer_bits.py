"""Per-layer bit widths: glob patterns over layer names resolved into one explicit record per layer.

``layer_bits`` (an option of ``lowbit.quantize`` and ``lowbit.qat``) maps glob patterns
(``fnmatch``, case-sensitive: ``"layers.0.*"``, ``"*.conv1"``, ``"fc"``) over the names of the
quantizable layers to a value:

- an int ``b`` (1..16): weights at ``b`` bits; the layer's input keeps its default width;
- a pair ``(w, a)``: weights at ``w`` bits, input at ``a`` bits (``a=None``: the input stays float);
- ``None``: the layer stays entirely in float (weights and input).

Patterns are applied in order over the defaults, so later patterns win. The defaults are the
config's uniform widths plus the first/last-layer protocol (``first_last_bits``: first and last
weights and the last layer's input; the first layer's input stays float unless
``quantize_input``), which is thus the first entry of the map and is overridden by any user
entry. A pattern that matches no quantizable layer is a LowbitError.

The result (``resolve_layer_bits``) is an explicit ``{name: LayerBits}`` map stored in the
quantized model's record (``lowbit.record_of(qmodel).layer_bits``) and in the artifact's
manifest; quantizers are set from it, and artifact validation checks each row against it. The
map is per layer (a later per-channel width would extend ``LayerBits``, not the patterns).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Annotated, Any, Mapping, Union

from .errors import LowbitError
from .options import Range, check_value

Bits = Annotated[int, Range(ge=1, le=16)]
LayerBitsValue = Union[Bits, tuple[Bits, Union[Bits, None]], None]
LayerBitsMap = Mapping[str, LayerBitsValue]
FLOAT_WORDS = ("fp", "float", "none", "null")  # CLI spellings of "keep in float"


@dataclass(frozen=True)
class LayerBits:
    """Resolved widths of one layer: ``w_bits`` None means the layer stays in float (``enabled`` False),
    ``a_bits`` None means its input stays float."""

    w_bits: int | None
    a_bits: int | None

    @property
    def enabled(self) -> bool:
        """Whether the layer is quantized at all (its weights are)."""
        return self.w_bits is not None

    def to_dict(self) -> dict[str, Any]:
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "enabled": self.enabled}


def check_layer_bits(value: Any, owner: str = "lowbit") -> dict[str, int | tuple[int, int | None] | None] | None:
    """Validate a ``layer_bits`` map (types and ranges; JSON lists are taken as pairs); None stays None."""
    checked = check_value(value, Union[dict[str, LayerBitsValue], None], "layer_bits", owner)
    if checked is not None:
        for pattern in checked:
            if not pattern:
                raise LowbitError(f"{owner}: option layer_bits has an empty pattern")
    return checked


def roles_of(names: list[str], order: list[str]) -> dict[str, str]:
    """Protocol role of every quantizable layer: first / last / only by execution order, body, or unused."""
    roles = {n: ("body" if n in order else "unused") for n in names}
    if order:
        roles[order[0]], roles[order[-1]] = "first", "last"
        if len(order) == 1:
            roles[order[0]] = "only"
    return roles


def default_bits(role: str, w_bits: int, a_bits: int | None, first_last_bits: int | None,
                 quantize_input: bool) -> LayerBits:
    """Widths the config gives a layer of ``role``: the uniform widths plus the first/last protocol."""
    if role == "unused":  # never called: no data to calibrate it, it stays float
        return LayerBits(None, None)
    a = None if role in ("first", "only") and not quantize_input else a_bits
    w = w_bits
    if first_last_bits is not None and role in ("first", "last", "only"):
        w = first_last_bits
        if role == "last" and a is not None:
            a = first_last_bits
    return LayerBits(w, a)


def _apply(current: LayerBits, default: LayerBits, value: Any) -> LayerBits:
    if value is None:
        return LayerBits(None, None)
    if isinstance(value, tuple):
        return LayerBits(value[0], value[1])
    # weight bits only: the input keeps its width (its default when an earlier entry made it float)
    return LayerBits(value, current.a_bits if current.enabled else default.a_bits)


def resolve_layer_bits(names: list[str], order: list[str], w_bits: int, a_bits: int | None,
                       first_last_bits: int | None, quantize_input: bool,
                       layer_bits: LayerBitsMap | None = None) -> dict[str, LayerBits]:
    """The explicit per-layer widths for layers ``names`` (called in ``order``).

    Args:
        names: every quantizable layer's name (model order).
        order: names of the layers a forward pass calls, in call order.
        w_bits, a_bits, first_last_bits, quantize_input: the config's uniform settings.
        layer_bits: user entries, pattern -> value, applied in order after the defaults.

    Raises:
        LowbitError: a pattern matches no quantizable layer (the error names it and lists
            some layer names).
    """
    roles = roles_of(names, order)
    defaults = {n: default_bits(roles[n], w_bits, a_bits, first_last_bits, quantize_input) for n in names}
    resolved = dict(defaults)
    layer_bits = check_layer_bits(layer_bits) or {}
    for pattern, value in layer_bits.items():
        for n in matching(names, pattern):
            if roles[n] != "unused":  # a layer never called has nothing to calibrate: it stays float
                resolved[n] = _apply(resolved[n], defaults[n], value)
    return resolved


def matching(names: list[str], pattern: str) -> list[str]:
    """The layer names ``pattern`` matches; a LowbitError naming the pattern (and some layers) when none."""
    matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        some = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
        raise LowbitError(f"layer_bits: pattern {pattern!r} matches no quantizable layer (layers: {some}; "
                          f"patterns are fnmatch globs over module names, e.g. 'layers.0.*', '*.conv1')")
    return matched


def check_patterns(model: Any, layer_bits: LayerBitsMap | None) -> None:
    """Refuse a pattern that matches none of ``model``'s quantizable layers (before any data is read)."""
    from .quant.layers import quantizable

    names = [n for n, m in model.named_modules() if quantizable(m)]
    for pattern in check_layer_bits(layer_bits) or {}:
        matching(names, pattern)


def record(resolved: Mapping[str, LayerBits]) -> dict[str, dict[str, Any]]:
    """JSON form of a resolved map (as ``lowbit_info["layer_bits"]`` shows it, and in the artifact manifest)."""
    return {n: lb.to_dict() for n, lb in resolved.items()}


def from_record(data: Any, where: str = "layer_bits") -> dict[str, LayerBits]:
    """A resolved map read back from JSON, every value checked; LowbitError naming the entry otherwise."""
    if not isinstance(data, dict) or not data:
        raise LowbitError(f"{where} must be a non-empty object of per-layer bit widths, got {_short(data)}")
    out = {}
    for name, entry in data.items():
        if (not isinstance(entry, dict) or set(entry) != {"w_bits", "a_bits", "enabled"}
                or not all(v is None or _is_bits(v) for v in (entry["w_bits"], entry["a_bits"]))
                or not isinstance(entry["enabled"], bool) or entry["enabled"] != (entry["w_bits"] is not None)
                or (entry["w_bits"] is None and entry["a_bits"] is not None)):
            raise LowbitError(f"{where}: entry {name!r} must be {{\"w_bits\": 1..16 or null, \"a_bits\": 1..16 "
                              f"or null, \"enabled\": w_bits is not null}} (a float layer has no input bits), "
                              f"got {_short(entry)}")
        out[name] = LayerBits(entry["w_bits"], entry["a_bits"])
    return out


def parse_cli_entry(text: str) -> tuple[str, int | tuple[int, int | None] | None]:
    """``PATTERN=VALUE`` of ``--layer-bits``: VALUE an int, ``fp``, or ``W,A`` (A an int or ``fp``)."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern or not value:
        raise LowbitError(f"--layer-bits {text!r}: expected PATTERN=BITS, PATTERN=fp or PATTERN=W,A "
                          f"(e.g. 'layers.0.*=8', 'fc=fp', 'conv1=4,8')")
    parts = [p.strip() for p in value.split(",")]

    def one(part: str, allow_float: bool) -> int | None:
        if allow_float and part.lower() in FLOAT_WORDS:
            return None
        try:
            return int(part)
        except ValueError:
            raise LowbitError(f"--layer-bits {text!r}: {part!r} is not a bit width"
                              + (" or fp" if allow_float else "")) from None

    if len(parts) == 1:
        parsed: Any = one(parts[0], True)
    elif len(parts) == 2:
        parsed = (one(parts[0], False), one(parts[1], True))
    else:
        raise LowbitError(f"--layer-bits {text!r}: a value is BITS, fp or W,A")
    check_value({pattern: parsed}, dict[str, LayerBitsValue], "--layer-bits", "lowbit")
    return pattern, parsed


def _is_bits(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
