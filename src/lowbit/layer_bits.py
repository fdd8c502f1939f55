"""Per-layer bit widths: glob patterns over layer names resolved into one explicit record per layer.

``layer_bits`` (an option of ``lowbit.quantize`` and ``lowbit.qat``) maps glob patterns
(``fnmatch``, case-sensitive: ``"layers.0.*"``, ``"*.conv1"``, ``"fc"``) over the names of the
quantizable layers to a value:

- an int ``b`` (1..16): weights at ``b`` bits; the layer's input keeps its default width;
- a pair ``(w, a)``: weights at ``w`` bits, input at ``a`` bits (``a=None``: the input stays float);
- ``None``: the layer stays entirely in float (weights and input);
- per-channel weight widths: a list or tuple (of any length but 2), or a 1-D integer tensor or
  array, of one width 0..16 per output channel (for a grouped ConvTranspose2d: per channel of
  its weight's axis 1, the channels its per-channel scales cover), 0 pruning the channel (its
  weights are exactly 0; its bias stays), or the pair ``(widths, a)``. A two-element list of
  ints is always the pair ``(w, a)``: give a 2-channel layer's widths as a tensor or as
  ``([w0, w1], a)``. A per-channel value forces per-channel weight scales for that layer,
  whatever the config's granularity; its length must be the layer's channel count (a pattern
  that matches layers of different channel counts is an error naming the layer). The layer's
  ``w_bits`` is ``quant.spec.storage_bits`` of its widths (the widest; 2 when 1-bit channels sit
  beside pruned ones), each channel's codes inside its own range; the artifact (version 5) packs
  each channel's codes at its own width, pruned channels none. Signed 1-bit channels are
  binary (``{-1, +1}`` times the channel's scale), as a whole 1-bit layer is. A pruned channel's
  output is its bias alone (after BN folding, the folded bias ``beta - gamma * mean / std``: a
  constant, not 0); with ``fold_bn=False`` the following BatchNorm still normalises that constant
  (its output is ``beta + gamma * (bias - mean) / std``, also a constant), so pruning a channel
  removes its weights, not the channel from the graph. Only ``lowbit.quantize`` (PTQ) honours
  per-channel widths (``aciq-mix``, which allocates its own, refuses them, as ``lowbit.qat`` does).

Patterns are applied in order over the defaults, so later patterns win. The defaults are the
config's uniform widths plus the first/last-layer protocol (``first_last_bits``: first and last
weights and the last layer's input; the first layer's input stays float unless
``quantize_input``), which is thus the first entry of the map and is overridden by any user
entry. A pattern that matches no quantizable layer is a LowbitError.

The result (``resolve_layer_bits``) is an explicit ``{name: LayerBits}`` map stored in the
quantized model's record (``lowbit.record_of(qmodel).layer_bits``) and in the artifact's
manifest; ``graph.surgery.prepare`` declares every layer's spec from it (``quant.declare``) and
builds the quantizers from those, and artifact validation checks each row against it.
Per-channel widths ride on ``LayerBits.channel_bits``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Annotated, Any, Mapping, Union

import numpy as np
import torch

from .errors import LowbitError
from .options import Range, check_value
from .quant.spec import storage_bits

Bits = Annotated[int, Range(ge=1, le=16)]
LayerBitsValue = Union[Bits, tuple[Bits, Union[Bits, None]], None]
LayerBitsMap = Mapping[str, Any]
FLOAT_WORDS = ("fp", "float", "none", "null")  # CLI spellings of "keep in float"
MAX_CHANNEL_BITS = 16


@dataclass(frozen=True)
class ChannelBits:
    """A checked per-channel weight-width value of a ``layer_bits`` map: one width 0..16 per channel."""

    widths: tuple[int, ...]

    @property
    def w_bits(self) -> int:
        """The storage width (``quant.spec.storage_bits``)."""
        return storage_bits(self.widths)


@dataclass(frozen=True)
class LayerBits:
    """Resolved widths of one layer: ``w_bits`` None means the layer stays in float (``enabled`` False),
    ``a_bits`` None means its input stays float; ``channel_bits`` (None: one width for the layer) gives
    every output channel its own weight width (0: pruned), ``w_bits`` then being their storage width."""

    w_bits: int | None
    a_bits: int | None
    channel_bits: tuple[int, ...] | None = None

    @property
    def enabled(self) -> bool:
        """Whether the layer is quantized at all (its weights are)."""
        return self.w_bits is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"w_bits": self.w_bits, "a_bits": self.a_bits, "enabled": self.enabled}
        if self.channel_bits is not None:
            out["channel_bits"] = list(self.channel_bits)
        return out


def _is_width(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and 0 <= v <= MAX_CHANNEL_BITS


def _channel_bits(value: Any, pattern: str, owner: str) -> ChannelBits:
    """A per-channel width sequence / tensor / array as ``ChannelBits``; LowbitError naming the pattern otherwise."""
    where = f"{owner}: option layer_bits[{pattern!r}]"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 1 or value.dtype in (torch.bool, np.bool_) or not (
                (isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex())
                or (isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.integer))):
            raise LowbitError(f"{where}: a per-channel width tensor must be 1-D of an integer dtype, got "
                              f"{tuple(value.shape)} {value.dtype}")
        value = [int(v) for v in value.tolist()]
    widths = list(value)
    if not widths or not all(_is_width(b) for b in widths):
        bad = next((b for b in widths if not _is_width(b)), None) if widths else "an empty sequence"
        raise LowbitError(f"{where}: per-channel widths must be integers from 0 to {MAX_CHANNEL_BITS} (0 prunes "
                          f"the channel), one per output channel, got {bad!r}")
    if max(widths) == 0:
        raise LowbitError(f"{where}: every channel is pruned; keep at least one channel (or the layer in float: None)")
    return ChannelBits(tuple(int(b) for b in widths))


_SEQUENCES = (list, tuple, torch.Tensor, np.ndarray)


def _is_channel_value(value: Any) -> bool:
    """Whether a map value is per-channel widths (a tensor, an array, or a sequence of other than 2 items)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return True
    return isinstance(value, (list, tuple)) and len(value) != 2


def _check_entry(pattern: str, value: Any, owner: str) -> Any:
    if _is_channel_value(value):
        return _channel_bits(value, pattern, owner)
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], _SEQUENCES):
        # the pair (widths, a): here any sequence is per-channel widths, two of them included
        a = check_value({pattern: (4, value[1])}, dict[str, LayerBitsValue], "layer_bits", owner)[pattern][1]
        return (_channel_bits(value[0], pattern, owner), a)
    return check_value({pattern: value}, dict[str, LayerBitsValue], "layer_bits", owner)[pattern]


def check_layer_bits(value: Any, owner: str = "lowbit") -> dict[str, Any] | None:
    """Validate a ``layer_bits`` map (types and ranges; JSON lists of two are taken as pairs, longer
    ones as per-channel widths); None stays None. Per-channel values come back as ``ChannelBits``."""
    checked = check_value(value, Union[dict[str, Any], None], "layer_bits", owner)
    if checked is None:
        return None
    out = {}
    for pattern, entry in checked.items():
        if not isinstance(pattern, str):
            check_value(value, Union[dict[str, LayerBitsValue], None], "layer_bits", owner)  # the usual message
        if not pattern:
            raise LowbitError(f"{owner}: option layer_bits has an empty pattern")
        out[pattern] = entry if isinstance(entry, ChannelBits) or (
            isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], ChannelBits)) else \
            _check_entry(pattern, entry, owner)
    return out


def has_channel_bits(layer_bits: Mapping[str, Any] | None) -> bool:
    """Whether a checked ``layer_bits`` map holds a per-channel value."""
    return any(isinstance(v, ChannelBits) or (isinstance(v, tuple) and isinstance(v[0], ChannelBits))
               for v in (layer_bits or {}).values())


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


def _weights(w: int | ChannelBits) -> tuple[int, tuple[int, ...] | None]:
    return (w.w_bits, w.widths) if isinstance(w, ChannelBits) else (w, None)


def _apply(current: LayerBits, default: LayerBits, value: Any) -> LayerBits:
    if value is None:
        return LayerBits(None, None)
    if isinstance(value, tuple):
        return LayerBits(*_weights(value[0])[:1], value[1], _weights(value[0])[1])
    # weight bits only: the input keeps its width (its default when an earlier entry made it float)
    w, per_channel = _weights(value)
    return LayerBits(w, current.a_bits if current.enabled else default.a_bits, per_channel)


def _check_channels(pattern: str, name: str, value: Any, names: list[str], channels: Mapping[str, int] | None) -> None:
    """A per-channel value must have one width per channel of every layer its pattern matches."""
    cb = value[0] if isinstance(value, tuple) else value
    if not isinstance(cb, ChannelBits):
        return
    if channels is None or name not in channels:
        raise LowbitError(f"layer_bits[{pattern!r}]: per-channel widths need the layers' channel counts")
    if len(cb.widths) != channels[name]:
        counts = sorted({channels[n] for n in matching(names, pattern) if n in channels})
        also = (f"; the pattern matches layers of {counts} channels: one per-channel list fits layers of one "
                f"channel count only") if len(counts) > 1 else ""
        raise LowbitError(f"layer_bits[{pattern!r}]: layer {name!r} has {channels[name]} output channels, the "
                          f"per-channel widths give {len(cb.widths)}{also}")


def resolve_layer_bits(names: list[str], order: list[str], w_bits: int, a_bits: int | None,
                       first_last_bits: int | None, quantize_input: bool,
                       layer_bits: LayerBitsMap | None = None,
                       channels: Mapping[str, int] | None = None) -> dict[str, LayerBits]:
    """The explicit per-layer widths for layers ``names`` (called in ``order``).

    Args:
        names: every quantizable layer's name (model order).
        order: names of the layers a forward pass calls, in call order.
        w_bits, a_bits, first_last_bits, quantize_input: the config's uniform settings.
        layer_bits: user entries, pattern -> value, applied in order after the defaults.
        channels: each layer's channel count (the size of its weight's output-channel axis),
            needed by per-channel values.

    Raises:
        LowbitError: a pattern matches no quantizable layer (the error names it and lists
            some layer names); a per-channel value whose length is not a matched layer's
            channel count (naming the layer).
    """
    roles = roles_of(names, order)
    defaults = {n: default_bits(roles[n], w_bits, a_bits, first_last_bits, quantize_input) for n in names}
    resolved = dict(defaults)
    layer_bits = check_layer_bits(layer_bits) or {}
    for pattern, value in layer_bits.items():
        for n in matching(names, pattern):
            _check_channels(pattern, n, value, names, channels)
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
        if (not isinstance(entry, dict) or not {"w_bits", "a_bits", "enabled"} <= set(entry) <= _RECORD_KEYS
                or not all(v is None or _is_bits(v) for v in (entry["w_bits"], entry["a_bits"]))
                or not isinstance(entry["enabled"], bool) or entry["enabled"] != (entry["w_bits"] is not None)
                or (entry["w_bits"] is None and entry["a_bits"] is not None)
                or not _record_channels_ok(entry)):
            raise LowbitError(f"{where}: entry {name!r} must be {{\"w_bits\": 1..16 or null, \"a_bits\": 1..16 "
                              f"or null, \"enabled\": w_bits is not null}} (a float layer has no input bits), "
                              f"optionally with \"channel_bits\": a list of widths 0..16 whose storage width is "
                              f"w_bits, got {_short(entry)}")
        cb = entry.get("channel_bits")
        out[name] = LayerBits(entry["w_bits"], entry["a_bits"], None if cb is None else tuple(cb))
    return out


_RECORD_KEYS = {"w_bits", "a_bits", "enabled", "channel_bits"}


def _record_channels_ok(entry: dict) -> bool:
    if "channel_bits" not in entry:
        return True
    cb = entry["channel_bits"]
    return (isinstance(cb, list) and bool(cb) and all(type(b) is int and 0 <= b <= MAX_CHANNEL_BITS for b in cb)
            and max(cb) > 0 and entry["w_bits"] == storage_bits(cb))


def parse_cli_entry(text: str) -> tuple[str, Any]:
    """``PATTERN=VALUE`` of ``--layer-bits``: VALUE an int, ``fp``, ``W,A`` (A an int or ``fp``), or
    per-channel widths ``[W0,W1,...]`` (0 prunes a channel), optionally followed by ``,A``."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern or not value:
        raise LowbitError(f"--layer-bits {text!r}: expected PATTERN=BITS, PATTERN=fp, PATTERN=W,A or "
                          f"PATTERN=[W0,W1,...] (e.g. 'layers.0.*=8', 'fc=fp', 'conv1=4,8', 'conv1=[8,8,4,0]')")
    value = value.strip()
    if value.startswith("["):
        inner, close, rest = value[1:].partition("]")
        rest = rest.strip()
        if not close or (rest and not rest.startswith(",")):
            raise LowbitError(f"--layer-bits {text!r}: per-channel widths are [W0,W1,...], optionally followed by ,A")
        try:
            widths = [int(p) for p in inner.split(",")]
        except ValueError:
            raise LowbitError(f"--layer-bits {text!r}: per-channel widths must be integers 0..16") from None
        channel = _channel_bits(widths, pattern, "--layer-bits")
        if not rest:
            return pattern, channel
        a_text = rest[1:].strip()
        if a_text.lower() in FLOAT_WORDS:
            return pattern, (channel, None)
        try:
            a = int(a_text)
        except ValueError:
            raise LowbitError(f"--layer-bits {text!r}: {a_text!r} is not a bit width or fp") from None
        check_value({pattern: (4, a)}, dict[str, LayerBitsValue], "--layer-bits", "lowbit")
        return pattern, (channel, a)
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
