"""Deployment: packed integer artifacts (safetensors), ONNX QDQ graphs, the integer-only reference path."""
from __future__ import annotations

from typing import Any

from .artifact import load_artifact, read_artifact, save_artifact
from .packing import pack_codes, unpack_codes

# loaded on first use: they pull in onnx / onnxruntime, which ``import lowbit`` should not pay for
_LAZY = {
    "export_onnx": "onnx_qdq", "build_onnx": "onnx_qdq", "export_float_onnx": "onnx_qdq",
    "onnx_session": "onnx_qdq", "onnx_predict": "onnx_qdq", "onnx_accuracy": "onnx_qdq",
    "onnx_parity": "onnx_qdq", "onnx_weight_report": "onnx_qdq",
    "IntegerModel": "integer", "integer_model": "integer", "integer_agreement": "integer",
    "with_int32_bias": "integer",
}

__all__ = ["load_artifact", "read_artifact", "save_artifact", "pack_codes", "unpack_codes", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
