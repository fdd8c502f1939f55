"""Quantization-aware training: the engine, LSQ and GDRQ."""
from .engine import QatConfig
from .registry import qat_methods, register_qat_method
from .run import qat

__all__ = ["QatConfig", "qat", "qat_methods", "register_qat_method"]
