"""Quantization configuration: one frozen dataclass shared by every method."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .errors import LowbitError
from .quant.quantizer import GRANULARITIES
from .quant.uniform import check_bits


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized (independent of the method's own options).

    Attributes:
        w_bits: weight bit width of body layers (1..16).
        a_bits: activation bit width of body-layer inputs (1..16), or None for weights only.
        granularity: weight scales per "tensor", per output "channel", or per "group".
        groups: number of output-channel groups when granularity is "group".
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
        progress: show progress bars.
    """

    w_bits: int = 4
    a_bits: int | None = 4
    granularity: str = "channel"
    groups: int | None = None
    w_symmetric: bool = True
    w_narrow: bool = True
    a_symmetric: bool = False
    first_last_bits: int | None = 8
    quantize_input: bool = False
    fold_bn: bool = True
    equalize: bool = False
    calib_size: int = 1024
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group" and (not isinstance(self.groups, int) or self.groups < 1):
            raise LowbitError(f"granularity 'group' needs groups >= 1, got {self.groups!r}")
        if self.calib_size < 1 or self.batch_size < 1:
            raise LowbitError("calib_size and batch_size must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_(self, **changes) -> "QuantConfig":
        return replace(self, **changes)


CONFIG_FIELDS = frozenset(f.name for f in fields(QuantConfig))
