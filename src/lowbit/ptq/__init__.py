"""Post-training quantization methods (each registers itself by name)."""
from .registry import get_method, method_table, methods, register_method

__all__ = ["get_method", "method_table", "methods", "register_method"]
