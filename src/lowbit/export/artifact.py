"""The lowbit artifact: packed integer weights + scales + manifest in one safetensors file."""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..graph.fold import apply_fold_structure
from ..graph.surgery import count_float_layers, wrap_layers
from ..quant.layers import QuantConv2d, quant_layers
from .packing import pack_codes, unpack_codes

FORMAT = "lowbit-artifact"
VERSION = "1"


def require_quantized(qmodel: nn.Module) -> dict:
    """The model's lowbit record; a LowbitError when it was not produced by lowbit.quantize."""
    info = getattr(qmodel, "lowbit_info", None)
    if not isinstance(qmodel, nn.Module) or info is None or not quant_layers(qmodel):
        raise LowbitError("export needs a model returned by lowbit.quantize (or lowbit.load); "
                          "this one was never quantized")
    return info


def layer_manifest(name: str, layer: nn.Module) -> dict:
    wq, aq = layer.weight_quant, layer.input_quant
    return {
        "kind": "conv" if isinstance(layer, QuantConv2d) else "linear",
        "role": layer.role,
        "weight_shape": list(layer.weight.shape),
        "w_enabled": wq.enabled, "w_bits": wq.bits, "w_signed": wq.signed, "w_symmetric": wq.symmetric,
        "w_narrow": wq.narrow, "granularity": wq.granularity, "num_groups": wq.num_groups,
        "w_qmin": wq.qrange[0], "w_binary": wq.binary,
        "a_enabled": aq.enabled, "a_bits": aq.bits, "a_signed": aq.signed, "a_symmetric": aq.symmetric,
    }


def atomic_write(path: Path, write) -> None:
    """Run ``write(tmp_path)`` then rename over ``path``, so no half-written file is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@torch.no_grad()
def save_artifact(qmodel: nn.Module, path: str | os.PathLike) -> Path:
    """Write packed weights, scales, zero points, bit widths and the manifest (safetensors)."""
    from safetensors.torch import save_file

    info = require_quantized(qmodel)
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    layers = {}
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    for name, layer in quant_layers(qmodel):
        layers[name] = layer_manifest(name, layer)
        if layer.weight_quant.enabled:
            codes = layer.weight_quant.quantize(layer.weight).int_value
            qmin = -1 if layer.weight_quant.binary else layer.weight_quant.qrange[0]
            bits = layer.weight_quant.bits
            if layer.weight_quant.binary:
                codes = (codes + 1) // 2 - 1  # {-1, +1} -> {-1, 0}: one bit each
            tensors[f"{name}.weight.codes"] = pack_codes(codes, bits, qmin)
            del state[f"{name}.weight"]
    for key, value in state.items():
        tensors[key] = value.contiguous().float() if value.is_floating_point() else value.contiguous()
    manifest = {"arch": info.get("arch"), "method": info.get("method"), "config": info.get("config"),
                "options": info.get("options"), "fold_pairs": info.get("fold_pairs", []), "layers": layers}
    metadata = {"format": FORMAT, "version": VERSION, "manifest": json.dumps(manifest)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def read_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """Manifest and tensors of an artifact; LowbitError for anything that is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"no artifact at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise LowbitError(f"{path} is not a lowbit artifact (not a readable safetensors file: {exc})") from None
    if meta.get("format") != FORMAT:
        raise LowbitError(f"{path} is not a lowbit artifact (format tag {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise LowbitError(f"{path}: artifact version {meta.get('version')!r} is not supported (need {VERSION})")
    try:
        manifest = json.loads(meta["manifest"])
        manifest["layers"], manifest["config"], manifest["fold_pairs"]  # noqa: B018  (required keys)
    except (KeyError, TypeError, json.JSONDecodeError):
        raise LowbitError(f"{path}: the artifact's manifest is missing or damaged") from None
    return manifest, tensors


@torch.no_grad()
def load_artifact(path: str | os.PathLike, model: nn.Module | None = None, device: str = "cpu") -> nn.Module:
    """Rebuild the quantized model stored at ``path``; ``model`` supplies only the architecture."""
    manifest, tensors = read_artifact(path)
    if model is None:
        arch = manifest.get("arch")
        if not arch:
            raise LowbitError("this artifact does not name a zoo architecture: pass model= (the FP model)")
        from ..models import create_model
        model = create_model(arch["name"], **arch.get("kwargs", {}))
    if not isinstance(model, nn.Module) or count_float_layers(model) == 0:
        raise LowbitError("model= must be the FP architecture the artifact was made from")
    cfg = QuantConfig.from_dict(manifest["config"]).with_(device=device)
    names = {n for n, _ in model.named_modules()}
    wanted = {n for pair in manifest["fold_pairs"] for n in pair} | set(manifest["layers"])
    if not wanted <= names:
        raise LowbitError(f"the model's layers do not match the artifact's (missing e.g. "
                          f"{sorted(wanted - names)[:3]}): pass the architecture it was made from")
    qmodel = copy.deepcopy(model).eval().to(device)
    apply_fold_structure(qmodel, [tuple(p) for p in manifest["fold_pairs"]])
    wrap_layers(qmodel, cfg)
    layers = dict(quant_layers(qmodel))
    if set(layers) != set(manifest["layers"]):
        raise LowbitError("the model's layers do not match the artifact's (different architecture?)")
    state = {}
    for name, spec in manifest["layers"].items():
        layer = layers[name]
        wq, aq = layer.weight_quant, layer.input_quant
        if list(layer.weight.shape) != spec["weight_shape"] or wq.num_groups != spec["num_groups"]:
            raise LowbitError(f"layer {name}: shape or groups differ from the artifact's")
        layer.role = spec["role"]
        if layer.bias is None and f"{name}.bias" in tensors:  # e.g. added by bias correction
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device))
        wq.bits, wq.enabled = spec["w_bits"], spec["w_enabled"]
        aq.bits, aq.enabled, aq.signed = spec["a_bits"], spec["a_enabled"], spec["a_signed"]
        if wq.enabled:
            wq.scale.copy_(tensors[f"{name}.weight_quant.scale"])
            wq.zero_point.copy_(tensors[f"{name}.weight_quant.zero_point"])
            qmin = -1 if wq.binary else wq.qrange[0]
            codes = unpack_codes(tensors.pop(f"{name}.weight.codes"), wq.bits, qmin, layer.weight.numel())
            if wq.binary:
                codes = 2 * (codes + 1) - 1
            state[f"{name}.weight"] = wq.dequantize(codes.view_as(layer.weight).float())
    state.update(tensors)
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LowbitError(f"artifact does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    qmodel.lowbit_info = {k: manifest.get(k) for k in ("arch", "method", "config", "options", "fold_pairs")}
    return qmodel.eval()
