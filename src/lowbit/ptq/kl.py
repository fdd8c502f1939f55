"""TensorRT entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017) as a PTQ method."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..quant.ranges import kl_range, minmax_range
from .common import calibrate_inputs, calibrate_weights, observe_fp_inputs
from .registry import register_method


@dataclass(frozen=True)
class KlOptions:
    """Options of ``method="kl"``.

    Attributes:
        bins: histogram bins over ``[0, max|x|]`` (per side for inputs with both signs); 2048 as TensorRT.
        eps: smoothing mass (in counts) given to empty histogram bins before the divergence.
        flatten_zero: replace the count of the bin holding 0 by its neighbour's (NVIDIA's
            pytorch-quantization does this; without it the exact zeros of ReLU inputs drag
            every threshold down).
    """

    bins: int = 2048
    eps: float = 1e-4
    flatten_zero: bool = True

    def __post_init__(self) -> None:
        if self.bins < 2 or not self.eps > 0:
            raise LowbitError("kl options: bins >= 2 and eps > 0")


@register_method("kl", KlOptions, description="TensorRT entropy calibration: activation clip minimising KL divergence")
def kl(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: KlOptions) -> None:
    """TensorRT recipe: weights by max|w| (min/max scales), activation ranges by entropy calibration.

    Each quantized input's FP values (sampled over the calibration set, extremes exact) are
    histogrammed and clipped at the threshold whose quantized histogram is closest to the
    reference in KL divergence (``quant.ranges.kl_range``).

    Known weakness, kept because it is TensorRT's: isolated spikes in a histogram (e.g. the
    constant outputs of the first conv on a uniform image background, one value per channel)
    are smeared by Q whenever a chunk spans several bins, so at 8 bit the divergence prefers
    windows of about ``2^bits`` bins (one bin per chunk) and clips hard: on the zoo ResNet-20
    the first block's input is clipped at 1.1 of its max 8.2 (W4A8 89.3% vs min/max 93.3%).
    """
    calibrate_weights(qmodel, minmax_range)
    calibrate_inputs(qmodel, observe_fp_inputs(qmodel, calib, cfg), kl_range, bins=opts.bins, eps=opts.eps,
                     flatten_zero=opts.flatten_zero)
