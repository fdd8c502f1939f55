"""Graph rewrites: BN folding, cross-layer equalization, layer wrapping (any CNN)."""
from .equalize import equalize, find_equalization_pairs
from .fold import find_conv_bn_pairs, fold_batchnorm, fold_conv_bn
from .surgery import prepare

__all__ = ["equalize", "find_equalization_pairs", "find_conv_bn_pairs", "fold_batchnorm", "fold_conv_bn",
           "prepare"]
