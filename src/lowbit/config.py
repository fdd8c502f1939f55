"""Quantization configuration: one frozen dataclass shared by every method."""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Annotated, Any, Literal, get_args

import torch

from .errors import LowbitError
from .options import Range, check_fields, check_value
from .quant.quantizer import GRANULARITIES

Bits = Annotated[int, Range(ge=1, le=16)]
Granularity = Literal["tensor", "channel", "group"]
assert get_args(Granularity) == GRANULARITIES  # one list of granularities


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized (independent of the method's own options).

    Attributes:
        w_bits: weight bit width of body layers (1..16).
        a_bits: activation bit width of body-layer inputs (1..16), or None for weights only.
        granularity: weight scales per "tensor", per output "channel", or per "group".
        groups: number of output-channel groups; only with granularity "group" (which needs it).
        w_symmetric: signed symmetric weight codes (else unsigned codes with a zero point).
        w_narrow: narrow signed range, e.g. [-7, 7] at 4 bit (else [-8, 7]).
        a_symmetric: signed symmetric codes for inputs that go negative (else zero point).
        first_last_bits: weight bits of the first and last layer and input bits of the last
            layer (the field's fair-comparison protocol); None quantizes them like the body.
        quantize_input: also quantize the network input (the first layer's input).
        fold_bn: fold BatchNorm into the preceding conv before quantization.
        equalize: cross-layer equalization before quantization (conv -> ReLU -> conv pairs).
        calib_size: calibration images used (more are subsampled deterministically).
        batch_size: batch size for calibration forward passes.
        seed: seed for sampling and stochastic parts of methods.
        device: "cpu", "cuda", "cuda:1", ...
        progress: show progress bars: True, False, or None (auto: when stderr is a terminal and
            the environment variable LOWBIT_PROGRESS is not 0; see ``lowbit.progress``).
    """

    w_bits: Bits = 4
    a_bits: Bits | None = 4
    granularity: Granularity = "channel"
    groups: int | None = None  # its range (>= 1) is checked with granularity, in __post_init__
    w_symmetric: bool = True
    w_narrow: bool = True
    a_symmetric: bool = False
    first_last_bits: Bits | None = 8
    quantize_input: bool = False
    fold_bn: bool = True
    equalize: bool = False
    calib_size: Annotated[int, Range(ge=1)] = 1024
    batch_size: Annotated[int, Range(ge=1)] = 256
    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 0  # numpy-compatible; methods add small offsets
    device: str | torch.device = "cpu"  # stored as its string, e.g. "cuda:0"
    progress: bool | None = None

    def __post_init__(self) -> None:
        check_fields(self, "QuantConfig")  # declared types and ranges first: "no" is not a bool
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))  # configs are stored as JSON
        if self.granularity == "group" and (self.groups is None or self.groups < 1):
            raise LowbitError(f"granularity 'group' needs groups >= 1, got {self.groups!r}")
        if self.granularity != "group" and self.groups is not None:
            # groups would be ignored: per-tensor or per-channel scales have no groups
            raise LowbitError(f"groups={self.groups!r} applies to granularity='group' only (granularity is "
                              f"{self.granularity!r}); pass granularity='group' to quantize in groups")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_(self, **changes) -> "QuantConfig":
        return replace(self, **changes)


CONFIG_FIELDS = frozenset(f.name for f in fields(QuantConfig))


def check_device(device: str | torch.device) -> None:
    """Refuse a device string torch does not know, or CUDA where it is not available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LowbitError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError(f"device {device!r} requested but CUDA is not available")


class _DefaultBits(int):
    """The default bit width (4), distinguishable from an explicit 4 so that config= can win."""


DEFAULT_BITS = _DefaultBits(4)


def build_config(w_bits: int, a_bits: int | None, options: dict[str, Any],
                 method_options: Collection[str] = (),
                 config_defaults: Mapping[str, Any] | None = None) -> tuple[QuantConfig, dict[str, Any]]:
    """Split ``options`` into a QuantConfig and the method's own options.

    Understands every ``QuantConfig`` field, ``config=`` (a QuantConfig to start from) and
    ``quantize_all=True`` (shorthand for ``first_last_bits=None, quantize_input=True``). Bits
    passed explicitly override those of a ``config=`` object; the defaults do not. Every value is
    checked against its declared type (``QuantConfig`` does it), so ``fold_bn="no"`` is refused.

    A name in ``method_options`` (the method's option names) stays with the method even when
    ``QuantConfig`` has a field of that name (``batch_size`` of brecq, qdrop and distill is the
    images per optimisation step); the config's field is then set through ``config=``.

    ``config_defaults`` (the method's own defaults for config fields, e.g. asymmetric weights for
    brecq and qdrop) apply to the fields that neither an option nor ``config=`` sets.

    Returns:
        The config and the remaining options (the method's own, checked by its registry entry).
    """
    options = dict(options)
    base = options.pop("config", None)
    if base is not None and not isinstance(base, QuantConfig):
        raise LowbitError("config= must be a lowbit.QuantConfig")
    common = {k: options.pop(k) for k in list(options) if k in CONFIG_FIELDS and k not in method_options}
    if check_value(options.pop("quantize_all", False), bool, "quantize_all", "lowbit"):
        implied = {"first_last_bits": None, "quantize_input": True}
        clash = sorted(k for k, v in implied.items() if k in common and common[k] != v)
        if clash:
            raise LowbitError(f"quantize_all=True sets {', '.join(f'{k}={implied[k]!r}' for k in clash)}; "
                              f"it contradicts {', '.join(f'{k}={common[k]!r}' for k in clash)}")
        common.update(implied)
    if base is None:
        base = QuantConfig()
        common = {**{k: v for k, v in (config_defaults or {}).items() if k not in common}, **common}
    elif common.get("granularity", "group") != "group" and "groups" not in common:
        common["groups"] = None  # the config's groups belong to the granularity being replaced
    bits = {name: value for name, value in (("w_bits", w_bits), ("a_bits", a_bits))
            if type(value) is not _DefaultBits}
    cfg = base.with_(**bits, **common)
    check_device(cfg.device)
    return cfg, options
