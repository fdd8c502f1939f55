"""Deployable artifacts: packed integer weights (safetensors)."""
from .artifact import load_artifact, read_artifact, save_artifact
from .packing import pack_codes, unpack_codes

__all__ = ["load_artifact", "read_artifact", "save_artifact", "pack_codes", "unpack_codes"]
