"""Quantization primitives: pure uniform functions, range estimators, quantizer modules, layers."""
from .layers import (LAYER_KINDS, QUANT_LAYERS, QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLayer,
                     QuantLinear, bake_weights, quant_layers)
from .quantizer import ActQuantizer, WeightQuantizer
from .ranges import RANGE_ESTIMATORS, aciq_range, lp_search_range, minmax_range
from .uniform import (QuantResult, dequantize_affine, fake_quantize, int_range, qparams_from_range,
                      quantize_affine, round_ste, to_int)

__all__ = ["LAYER_KINDS", "QUANT_LAYERS", "QuantConv1d", "QuantConv2d", "QuantConvTranspose2d", "QuantLayer",
           "QuantLinear", "bake_weights", "quant_layers", "ActQuantizer",
           "WeightQuantizer", "RANGE_ESTIMATORS", "aciq_range", "lp_search_range", "minmax_range",
           "QuantResult", "dequantize_affine", "fake_quantize", "int_range", "qparams_from_range",
           "quantize_affine", "round_ste", "to_int"]
