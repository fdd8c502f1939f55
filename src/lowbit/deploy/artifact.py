"""The lowbit artifact: packed integer weights + scales + manifest in one safetensors file."""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..files import atomic_write
from ..graph.fold import apply_fold_structure
from ..graph.surgery import count_float_layers, wrap_layers
from ..quant.layers import quant_layers
from ..quant.uniform import int_range
from .packing import pack_codes, packed_nbytes, unpack_codes

FORMAT = "lowbit-artifact"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # version 1: one tensor per layer field and a verbose per-layer manifest

# Columns of the manifest's "layers" rows (the manifest itself lists them under "fields").
FIELDS = ("name", "role", "shape", "groups", "w_bits", "w", "zp", "bias", "a_bits", "a", "a_signed", "bn")
# Documents the "params" blob inside the file, so that the format describes itself.
PARAMS_LAYOUT = ("float32, layers in order: weight scale[groups] if w, weight zero point[groups] if zp, "
                 "bias[shape[0]] if bias, input scale and zero point if a")
PARAMS_KEY = "params"
RUNTIME_CONFIG = ("device", "progress")  # settings of the run, not of the model: not stored


def codes_key(bits: int) -> str:
    """Name of the blob holding every layer's packed ``bits``-wide weight codes."""
    return f"codes{bits}"


def is_reserved(key: str) -> bool:
    """Whether ``key`` names one of the format's blobs (``params``, ``codes<b>``)."""
    return key == PARAMS_KEY or (key.startswith("codes") and key[5:].isdigit())


def require_quantized(qmodel: nn.Module) -> dict:
    """The model's lowbit record; a LowbitError when it was not produced by lowbit.quantize."""
    info = getattr(qmodel, "lowbit_info", None)
    if not isinstance(qmodel, nn.Module) or info is None or not quant_layers(qmodel):
        raise LowbitError("export needs a model returned by lowbit.quantize (or lowbit.load); "
                          "this one was never quantized")
    return info


def _flat(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).float().cpu()


def _weight_qmin(bits: int, signed: bool, narrow: bool) -> int:
    """Smallest code of a weight quantizer (binary {-1, +1} codes are stored as {-1, 0})."""
    return int_range(bits, signed, narrow)[0]


@torch.no_grad()
def save_artifact(qmodel: nn.Module, path: str | os.PathLike) -> Path:
    """Write packed weights, scales, zero points, bit widths and the manifest (safetensors).

    Layout: one uint8 blob ``codes<b>`` per weight bit width (each layer's codes packed densely,
    byte-aligned per layer), one float32 blob ``params`` (scales, zero points, biases, input
    quantizer parameters), every other tensor under its state-dict name, and a compact JSON
    manifest (architecture, config, method, input shape, one row per layer) in the metadata.
    """
    from safetensors.torch import save_file

    info = require_quantized(qmodel)
    path = Path(path)
    layers = dict(quant_layers(qmodel))
    order = [n for n in info.get("layer_order") or [] if n in layers]  # execution order first
    order += [n for n in layers if n not in order]
    bn_of: dict[str, str] = {}
    other_pairs = []
    for conv, bn in info.get("fold_pairs", []):
        if conv in layers and conv not in bn_of:
            bn_of[conv] = bn
        else:
            other_pairs.append([conv, bn])
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    codes: dict[int, list[Tensor]] = {}
    params: list[Tensor] = []
    rows = []
    for name in order:
        layer = layers[name]
        wq, aq = layer.weight_quant, layer.input_quant
        store_zp = wq.enabled and (not wq.symmetric or bool(wq.zero_point.any()))
        if wq.enabled:
            q = wq.quantize(layer.weight).int_value
            if wq.binary:
                q = (q + 1) // 2 - 1  # {-1, +1} -> {-1, 0}: one bit each
            codes.setdefault(wq.bits, []).append(pack_codes(q, wq.bits, _weight_qmin(wq.bits, wq.signed, wq.narrow)))
            params.append(_flat(wq.scale))
            if store_zp:
                params.append(_flat(wq.zero_point))
            del state[f"{name}.weight"]
        if layer.bias is not None:
            params.append(_flat(layer.bias))
        if aq.enabled:
            params += [_flat(aq.scale), _flat(aq.zero_point)]
        for key in ("bias", "weight_quant.scale", "weight_quant.zero_point", "input_quant.scale",
                    "input_quant.zero_point"):
            state.pop(f"{name}.{key}", None)
        rows.append([name, layer.role, list(layer.weight.shape), wq.num_groups, wq.bits, int(wq.enabled),
                     int(store_zp), int(layer.bias is not None), aq.bits, int(aq.enabled), int(aq.signed),
                     bn_of.get(name)])
    tensors: dict[str, Tensor] = {codes_key(b): torch.cat(c) for b, c in sorted(codes.items())}
    if params:
        tensors[PARAMS_KEY] = torch.cat(params)
    for key, value in state.items():
        if is_reserved(key):
            raise LowbitError(f"the model has a tensor named {key!r}, a name the artifact format reserves")
        tensors[key] = value.contiguous().float() if value.is_floating_point() else value.contiguous()
    config = {k: v for k, v in (info.get("config") or {}).items() if k not in RUNTIME_CONFIG}
    manifest = {"arch": info.get("arch"), "method": info.get("method"), "config": config,
                "options": info.get("options") or {}, "input_shape": info.get("input_shape"),
                "params": PARAMS_LAYOUT, "fields": list(FIELDS), "layers": rows}
    if other_pairs:
        manifest["fold_pairs"] = other_pairs
    metadata = {"format": FORMAT, "version": VERSION, "manifest": json.dumps(manifest, separators=(",", ":"))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


class _Reader:
    """Consumes a flat blob front to back; a LowbitError when it runs short."""

    def __init__(self, blob: Tensor | None, what: str) -> None:
        self.blob, self.pos, self.what = blob if blob is not None else torch.zeros(0), 0, what

    def take(self, n: int) -> Tensor:
        if self.pos + n > self.blob.numel():
            raise LowbitError(f"the artifact's {self.what} blob is too short for its manifest")
        out = self.blob[self.pos:self.pos + n].clone()
        self.pos += n
        return out

    def check_done(self) -> None:
        if self.pos != self.blob.numel():
            raise LowbitError(f"the artifact's {self.what} blob is longer than its manifest says")


def _expand(stored: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """The compact (version 2) manifest and blobs as one spec and named tensors per layer."""
    cfg = QuantConfig.from_dict(stored["config"])
    rows = [dict(zip(stored["fields"], row, strict=True)) for row in stored["layers"]]
    params = _Reader(tensors.pop(PARAMS_KEY, None), PARAMS_KEY)
    blobs = {b: _Reader(tensors.pop(codes_key(b)), codes_key(b))
             for b in {r["w_bits"] for r in rows if r["w"]}}
    out: dict[str, Tensor] = {}
    layers = {}
    for r in rows:
        name, shape, groups, bits = r["name"], [int(d) for d in r["shape"]], int(r["groups"]), int(r["w_bits"])
        layers[name] = {
            "kind": "conv" if len(shape) == 4 else "linear", "role": r["role"], "weight_shape": shape,
            "w_enabled": bool(r["w"]), "w_bits": bits, "w_signed": cfg.w_symmetric,
            "w_symmetric": cfg.w_symmetric, "w_narrow": cfg.w_narrow, "granularity": cfg.granularity,
            "num_groups": groups, "w_qmin": _weight_qmin(bits, cfg.w_symmetric, cfg.w_narrow),
            "w_binary": cfg.w_symmetric and bits == 1,
            "a_enabled": bool(r["a"]), "a_bits": r["a_bits"], "a_signed": bool(r["a_signed"]),
            "a_symmetric": cfg.a_symmetric,
        }
        if r["w"]:
            out[f"{name}.weight.codes"] = blobs[bits].take(packed_nbytes(math.prod(shape), bits))
            out[f"{name}.weight_quant.scale"] = params.take(groups)
            out[f"{name}.weight_quant.zero_point"] = params.take(groups) if r["zp"] else torch.zeros(groups)
        if r["bias"]:
            out[f"{name}.bias"] = params.take(shape[0])
        if r["a"]:
            out[f"{name}.input_quant.scale"] = params.take(1)
            out[f"{name}.input_quant.zero_point"] = params.take(1)
    params.check_done()
    for blob in blobs.values():
        blob.check_done()
    if any(is_reserved(k) for k in tensors):
        raise LowbitError("the artifact holds weight codes that no layer of its manifest uses")
    out.update(tensors)
    manifest = {k: stored.get(k) for k in ("arch", "method", "config", "options", "input_shape")}
    manifest["fold_pairs"] = [[r["name"], r["bn"]] for r in rows if r["bn"]] + stored.get("fold_pairs", [])
    manifest["layer_order"] = [r["name"] for r in rows if r["role"] != "unused"]
    manifest["layers"] = layers
    return manifest, out


def read_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """Manifest and tensors of an artifact; LowbitError for anything that is not one.

    Whatever the file's version, the manifest comes back with one spec per layer under
    ``"layers"`` (kind, role, weight_shape, w_bits, w_qmin, num_groups, a_bits, ...) and
    ``"fold_pairs"``, and the tensors by name: ``<layer>.weight.codes`` (packed uint8),
    ``<layer>.weight_quant.scale`` / ``.zero_point``, ``<layer>.bias``, ``<layer>.input_quant.*``.
    """
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
    version = meta.get("version")
    if version not in READABLE_VERSIONS:
        raise LowbitError(f"{path}: artifact version {version!r} is not supported (need one of {READABLE_VERSIONS})")
    try:
        manifest = json.loads(meta["manifest"])
        if version == "1":
            manifest["layers"], manifest["config"], manifest["fold_pairs"]  # noqa: B018  (required keys)
        else:
            manifest, tensors = _expand(manifest, tensors)
    except LowbitError as exc:
        raise LowbitError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):  # JSONDecodeError is a ValueError
        raise LowbitError(f"{path}: the artifact's manifest is missing or damaged") from None
    return manifest, tensors


def _disabled_quantizer_param(layers: dict[str, nn.Module], key: str) -> bool:
    """Whether ``key`` is the scale or zero point of a disabled quantizer (not stored: it plays no part)."""
    owner, _, leaf = key.rpartition(".")
    layer_name, _, quantizer = owner.rpartition(".")
    layer = layers.get(layer_name)
    if layer is None or leaf not in ("scale", "zero_point") or quantizer not in ("weight_quant", "input_quant"):
        return False
    return not getattr(layer, quantizer).enabled


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
            codes = codes.to(wq.scale.device)  # unpacked on the CPU; the scales live on ``device``
            if wq.binary:
                codes = 2 * (codes + 1) - 1
            state[f"{name}.weight"] = wq.dequantize(codes.view_as(layer.weight).float())
    state.update(tensors)
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _disabled_quantizer_param(layers, k)]
    if missing or unexpected:
        raise LowbitError(f"artifact does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    qmodel.lowbit_info = {k: manifest.get(k) for k in ("arch", "method", "options", "fold_pairs", "input_shape")}
    qmodel.lowbit_info["config"] = cfg.to_dict()
    if manifest.get("layer_order"):
        qmodel.lowbit_info["layer_order"] = manifest["layer_order"]
    return qmodel.eval()
