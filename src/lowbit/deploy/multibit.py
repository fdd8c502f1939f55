"""Export of multi-bit (DMBQ) models: a packed artifact of sign planes + alphas, and an ONNX graph.

DMBQ alphas are arbitrary reals, so a layer's weights are not on an integer grid: they are stored
as what they are, ``w = sum_i alpha_i b_i`` per output channel.

Artifact (``lowbit-multibit`` safetensors, read back by ``lowbit.load``): for every DMBQ layer the
channel's ``bits_c`` sign planes at one bit per weight (``b = +1`` stored as 1), all planes of a
layer in one byte-aligned run of the ``planes`` blob, and its ``bits_c`` float32 alphas in the
``params`` blob; a pruned channel (0 bits) stores nothing. Size: ``n_c * bits_c`` bits plus
``4 * bits_c`` bytes per channel, as ``deploy.size`` counts it. Layers on a uniform grid (the 8-bit
first and last layers) store packed integer codes and scales as in the lowbit artifact; DMBQ
input quantizers store their alphas. Reading checks every size against the manifest.

ONNX (no ``DequantizeLinear``): each DMBQ weight is rebuilt in the graph from its int8 sign planes,
``W = ReduceSum_i(Cast(B_i) * alpha_i)`` (the alphas per output channel; constant folding off, so
the planes stay in the file), feeding the
float ``Conv``/``Gemm``; each DMBQ input quantizer is a sum of steps over its sorted levels,
``Q(x) = L_0 + sum_k (L_k - L_(k-1)) * (x > t_k)`` with midpoints ``t_k`` (``Greater``, ``Cast``,
``Mul``, ``Add``). What an integer device runs instead: one binary convolution per weight plane
(and per input plane: ``{0,1}`` bits of the level index), ``y = sum_i sum_j alpha_i beta_j
(B_i * A_j)`` — ``M_w x M_a`` accumulations of +-1 / 0-1 products (XNOR/AND + popcount), each
scaled by ``alpha_i beta_j`` in the epilogue. That form is described here, not emitted.
"""
from __future__ import annotations

import copy
import io
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..files import atomic_write
from ..graph.fold import apply_fold_structure
from ..graph.surgery import wrap_layers
from ..layer_bits import from_record
from ..quant import spec as qspec
from ..quant.layer_specs import apply_layer_spec, code_books, layer_specs
from ..quant.layers import LAYER_KINDS, out_channels, quant_layers
from ..quant.spec import LayerSpec, TensorSpec
from ..quant.uniform import int_range
from ..record import QuantRecord, attach, publish
from .artifact import RUNTIME_CONFIG, _zoo_model, require_quantized
from .packing import pack_codes, packed_nbytes, unpack_codes

FORMAT = "lowbit-multibit"
DEFAULT_OPSET = 17  # plain float operators only: any opset ONNX Runtime runs
VERSION = "1"


def is_multibit_model(qmodel: Any) -> bool:
    """Whether a model holds DMBQ quantizers (and so exports through this module)."""
    return isinstance(qmodel, nn.Module) and "multibit" in code_books(qmodel)


def is_multibit_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file tagged as a multi-bit artifact."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


class _Reader:
    """Consumes a flat blob in order; every take is checked against its length."""

    def __init__(self, blob: Tensor | None, what: str) -> None:
        self.blob = blob if blob is not None else torch.zeros(0)
        self.what = what
        self.pos = 0

    def take(self, n: int) -> Tensor:
        if self.pos + n > self.blob.numel():
            raise LowbitError(f"the {self.what} blob is too short for the manifest's layers")
        out = self.blob[self.pos:self.pos + n]
        self.pos += n
        return out

    def check_done(self) -> None:
        if self.pos != self.blob.numel():
            raise LowbitError(f"the {self.what} blob holds {self.blob.numel() - self.pos} values no layer uses")


def _flat(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).float().cpu()


@torch.no_grad()
def save_multibit(qmodel: nn.Module, path: str | os.PathLike) -> Path:
    """Write a DMBQ model (sign planes + alphas; uniform layers as codes + scales) to ``path``."""
    from safetensors.torch import save_file

    info = require_quantized(qmodel)
    path = Path(path)
    layers = dict(quant_layers(qmodel))
    order = [n for n in info.get("layer_order") or [] if n in layers]
    order += [n for n in layers if n not in order]
    specs = {spec.name: spec for spec in layer_specs(qmodel)}
    config = {k: v for k, v in (info.get("config") or {}).items() if k not in RUNTIME_CONFIG}
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    planes_blob: list[Tensor] = []
    codes: dict[int, list[Tensor]] = {}
    params: list[Tensor] = []
    rows = []
    for name in order:
        layer, spec = layers[name], specs[name]
        ws, xs = spec.weight, spec.input
        row: dict[str, Any] = {"name": name, "kind": spec.kind, "role": spec.role,
                               "shape": list(spec.weight_shape), "bias": layer.bias is not None}
        if ws is not None and ws.kind == "multibit":
            q = qspec.codes(ws, layer.weight.detach())
            planes = qspec.bit_planes(ws, q)  # (bits, channels, n): a channel's first bits_c planes are its own
            bits = list(ws.widths)
            signs = [planes[:b, c].reshape(-1) for c, b in enumerate(bits) if b]
            if signs:
                planes_blob.append(pack_codes((torch.cat(signs) > 0).to(torch.int64), 1, 0))
            params += [_flat(ws.alphas[c, :b]) for c, b in enumerate(bits) if b]
            row["w"] = {"kind": "dmbq", "channel_bits": bits, "axis": ws.axis}
        elif ws is not None:
            q = qspec.codes(ws, layer.weight.detach())
            if ws.binary:
                q = (q + 1) // 2 - 1
            qmin = int_range(ws.bits, ws.signed, ws.narrow)[0]
            codes.setdefault(ws.bits, []).append(pack_codes(q, ws.bits, qmin))
            params += [_flat(ws.scale), _flat(ws.zero_point)]
            row["w"] = {"kind": "uniform", "bits": ws.bits, "groups": ws.num_groups, "granularity": ws.granularity,
                        "symmetric": ws.symmetric, "narrow": ws.narrow, "axis": ws.axis}
        else:
            row["w"] = None
        if xs is not None and xs.kind == "multibit":
            params.append(_flat(xs.alphas))
            row["a"] = {"kind": "dmbq", "bits": xs.bits, "signed": xs.signed}
        elif xs is not None and xs.kind == "uniform":
            params += [_flat(xs.scale), _flat(xs.zero_point)]
            row["a"] = {"kind": "uniform", "bits": xs.bits, "signed": xs.signed,
                        "symmetric": bool(config.get("a_symmetric", xs.symmetric))}
        elif xs is not None:
            raise LowbitError(f"layer {name!r}: {xs.kind} input codes have no place in a multi-bit artifact")
        else:
            row["a"] = None
        if layer.bias is not None:
            params.append(_flat(layer.bias))
        for key in list(state):
            if key.startswith((f"{name}.weight_quant.", f"{name}.input_quant.")) or key == f"{name}.bias" or (
                    key == f"{name}.weight" and row["w"] is not None):
                del state[key]
        rows.append(row)
    tensors: dict[str, Tensor] = {f"codes{b}": torch.cat(c) for b, c in sorted(codes.items())}
    if planes_blob:
        tensors["planes"] = torch.cat(planes_blob)
    if params:
        tensors["params"] = torch.cat(params)
    for key, value in state.items():
        if key in ("planes", "params") or key.startswith("codes"):
            raise LowbitError(f"the model has a tensor named {key!r}, a name the multi-bit artifact reserves")
        tensors[key] = value.contiguous().float() if value.is_floating_point() else value.contiguous()
    manifest = {"arch": info.get("arch"), "method": info.get("method"), "config": config,
                "options": info.get("options") or {}, "input_shape": info.get("input_shape"),
                "fold_pairs": info.get("fold_pairs") or [], "layer_bits": info.get("layer_bits"), "layers": rows}
    metadata = {"format": FORMAT, "version": VERSION, "manifest": json.dumps(manifest, separators=(",", ":"))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise LowbitError(message)


@torch.no_grad()
def load_multibit(path: str | os.PathLike, model: nn.Module | None = None, device: str = "cpu") -> nn.Module:
    """Rebuild a DMBQ model written by ``save_multibit``; ``model`` gives the architecture."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        manifest = json.loads(meta["manifest"])
    except Exception as exc:
        raise LowbitError(f"{path} is not a readable multi-bit artifact ({type(exc).__name__}: {exc})") from None
    try:
        return _rebuild(manifest, meta, tensors, model, device)
    except LowbitError as exc:
        raise LowbitError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:  # a damaged manifest
        raise LowbitError(f"{path}: damaged multi-bit artifact ({type(exc).__name__}: {exc})") from None


def _rebuild(manifest: dict, meta: dict, tensors: dict[str, Tensor], model: nn.Module | None,
             device: str) -> nn.Module:
    _check(meta.get("format") == FORMAT and meta.get("version") == VERSION, "not a version-1 multi-bit artifact")
    if model is None:
        model = _zoo_model(manifest.get("arch"))
    cfg = QuantConfig.from_dict(manifest["config"]).with_(device=device)
    qmodel = copy.deepcopy(model).eval().to(device)
    apply_fold_structure(qmodel, [tuple(p) for p in manifest["fold_pairs"]])
    wrap_layers(qmodel, cfg)
    layers = dict(quant_layers(qmodel))
    rows = manifest["layers"]
    _check(set(layers) == {r["name"] for r in rows}, "the model's layers do not match the artifact's rows")
    planes = _Reader(tensors.pop("planes", None), "planes")
    params = _Reader(tensors.pop("params", None), "params")
    blobs = {int(k[5:]): _Reader(tensors.pop(k), k) for k in list(tensors) if k.startswith("codes") and k[5:].isdigit()}
    handled: set[str] = set()
    for r in rows:
        name = r["name"]
        layer = layers[name]
        _check(list(layer.weight.shape) == r["shape"] and layer.kind == r["kind"],
               f"layer {name!r}: shape or kind differs from the artifact's")
        layer.role = r["role"]
        handled |= {f"{name}.weight", f"{name}.bias"}
        axis = LAYER_KINDS[layer.kind].axis
        channels = layer.weight.shape[axis]
        w, weight, wspec = r["w"], None, None
        if w is None:
            handled.discard(f"{name}.weight")  # the float weight is an ordinary tensor of the file
        elif w["kind"] == "dmbq":
            bits = torch.tensor(w["channel_bits"], dtype=torch.int64)
            _check(bits.numel() == channels and bool(((bits >= 0) & (bits <= qspec.MAX_BASES)).all()),
                   f"layer {name!r}: channel_bits must hold 0..{qspec.MAX_BASES} for each of {channels} channels")
            widths = bits.tolist()
            n = layer.weight.numel() // channels
            total = int(bits.sum())
            signs = unpack_codes(planes.take(packed_nbytes(total * n, 1)), 1, 0, total * n) if total else None
            alphas = torch.zeros(channels, max(widths))
            rows_w = torch.zeros(channels, n)
            pos = 0
            for c, b in enumerate(widths):
                if b == 0:
                    continue
                alpha = params.take(b)
                alphas[c, :b] = alpha
                plane = signs[pos:pos + b * n].view(b, n).float() * 2 - 1
                pos += b * n
                rows_w[c] = alpha @ plane
            wspec = TensorSpec("multibit", max(widths), True, True, False, "channel", channels, channels, w["axis"],
                               tuple(widths), alphas=alphas)
            weight = qspec.ungroup_rows(wspec, rows_w, layer.weight.shape)
        elif w["kind"] == "uniform":
            groups, wbits = w["groups"], w["bits"]
            _check(isinstance(groups, int) and groups >= 1, f"layer {name!r}: scale groups must be a positive integer")
            scale, zero = params.take(groups).clone(), params.take(groups).clone()
            wspec = TensorSpec("uniform", wbits, bool(w["symmetric"]), bool(w["symmetric"]), bool(w["narrow"]),
                               w["granularity"], channels, groups, w["axis"], scale=scale, zero_point=zero)
            reader = blobs.get(wbits)
            _check(reader is not None, f"layer {name!r}: no codes{wbits} blob")
            qmin = -1 if wspec.binary else qspec.qrange(wspec)[0]
            c = unpack_codes(reader.take(packed_nbytes(layer.weight.numel(), wbits)), wbits, qmin, layer.weight.numel())
            if wspec.binary:
                c = 2 * (c + 1) - 1
            weight = qspec.dequantize(wspec, c.view_as(layer.weight))
        else:
            raise LowbitError(f"layer {name!r}: unknown weight kind {w['kind']!r}")
        a, aspec = r["a"], None
        if a is None:
            pass
        elif a["kind"] == "dmbq":
            aspec = TensorSpec("multibit", a["bits"], bool(a["signed"]), alphas=params.take(a["bits"]).view(1, -1).clone())
        elif a["kind"] == "uniform":
            aspec = TensorSpec("uniform", a["bits"], bool(a["signed"]), bool(a["signed"]), False,
                               scale=params.take(1).clone(), zero_point=params.take(1).clone())
        else:
            raise LowbitError(f"layer {name!r}: unknown input kind {a['kind']!r}")
        # the quantizers the specs describe (quant.layer_specs), then the stored weight values
        apply_layer_spec(layer, LayerSpec(name, r["kind"], r["role"], tuple(r["shape"]), out_channels(layer),
                                          wspec, aspec))
        if weight is not None:
            layer.weight.copy_(weight.to(layer.weight.device))
        if r["bias"]:
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(out_channels(layer), device=layer.weight.device))
            layer.bias.copy_(params.take(out_channels(layer)))
    planes.check_done()
    params.check_done()
    for reader in blobs.values():
        reader.check_done()
    state = OrderedDict(tensors)
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in handled and ".weight_quant." not in k and ".input_quant." not in k]
    _check(not missing and not unexpected,
           f"artifact does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    stored_bits = manifest.get("layer_bits")
    attach(qmodel, QuantRecord(cfg, layer_order=[r["name"] for r in rows],
                               layer_bits=from_record(stored_bits, "the artifact's layer_bits") if stored_bits else {},
                               fold_pairs=[tuple(p) for p in manifest["fold_pairs"]], arch=manifest.get("arch"),
                               method=manifest.get("method"), options=manifest.get("options") or {},
                               input_shape=manifest.get("input_shape")))
    publish(qmodel)
    return qmodel.eval()


# --------------------------------------------------------------------------------------- ONNX


class _PlaneWeight(nn.Module):
    """Export form of a multibit weight: ``sum_i alpha_i * float(B_i)`` from int8 sign planes."""

    def __init__(self, spec: TensorSpec, weight: Tensor) -> None:
        super().__init__()
        m = max(spec.bits, 1)
        planes = torch.zeros(m, *qspec.group_rows(spec, weight).shape, dtype=torch.int8)  # pruned: planes 0, alphas 0
        planes[:spec.bits] = qspec.bit_planes(spec, qspec.codes(spec, weight.detach())).cpu()
        moved = weight.movedim(spec.axis, 0) if spec.axis else weight
        planes_t = planes.view((m,) + tuple(moved.shape))
        if spec.axis:
            planes_t = planes_t.movedim(1, spec.axis + 1)
        self.register_buffer("planes", planes_t.contiguous())
        alpha = torch.zeros(spec.channels, m)
        alpha[:, :spec.bits] = spec.alphas
        view = [m] + [1] * weight.dim()
        view[spec.axis + 1] = spec.channels
        self.register_buffer("alpha", alpha.T.contiguous().view(view))

    def forward(self, w: Tensor) -> Tensor:
        return (self.planes.to(w.dtype) * self.alpha).sum(0)


class _StepAct(nn.Module):
    """Export form of a multibit input: ``L_0 + sum_k (L_k - L_(k-1)) * (x > t_k)``."""

    def __init__(self, spec: TensorSpec) -> None:
        super().__init__()
        lv = qspec.levels(spec)[0].sort().values
        self.register_buffer("low", lv[:1].clone())
        self.register_buffer("steps", (lv[1:] - lv[:-1]).clone())
        self.register_buffer("mids", ((lv[1:] + lv[:-1]) / 2).clone())

    def forward(self, x: Tensor) -> Tensor:
        out = self.low.expand_as(x)
        for k in range(self.mids.numel()):
            # strictly greater: a tie at a midpoint goes to the lower level, as dmbq.assign does
            out = out + (x > self.mids[k]).to(x.dtype) * self.steps[k]
        return out


@torch.no_grad()
def export_multibit_onnx(qmodel: nn.Module, path: str | os.PathLike, opset: int | None = None,
                         input_shape: tuple[int, ...] | None = None) -> Path:
    """Write the DequantizeLinear-free ONNX graph of a DMBQ model (see the module docstring)."""
    import onnx

    from .onnx_qdq import fix_adaptive_pools

    info = require_quantized(qmodel)
    path = Path(path)
    twin = copy.deepcopy(qmodel).cpu().eval()
    layers = dict(quant_layers(twin))
    for spec in layer_specs(twin):
        layer = layers[spec.name]
        if spec.weight is not None and spec.weight.kind == "multibit":
            layer.weight_quant = _PlaneWeight(spec.weight, layer.weight)
        if spec.input is not None and spec.input.kind == "multibit":
            layer.input_quant = _StepAct(spec.input)
    shape = tuple(input_shape) if input_shape else tuple(info.get("input_shape") or ())
    if not shape:
        raise LowbitError("ONNX export of a multi-bit model needs input_shape= (the model has no recorded one)")
    example = torch.zeros((1,) + shape)
    buffer = io.BytesIO()
    try:
        if example.dim() == 4:
            fix_adaptive_pools(twin, example)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")  # the legacy exporter's deprecation notices are noise
            # no constant folding: it would multiply the planes out into one float weight
            torch.onnx.export(twin, (example,), buffer, dynamo=False, opset_version=opset or DEFAULT_OPSET,
                              do_constant_folding=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:
        raise LowbitError(f"torch.onnx.export could not trace the multi-bit model: {type(exc).__name__}: {exc}") from None
    proto = onnx.load_from_string(buffer.getvalue())
    if any(node.op_type == "DequantizeLinear" for node in proto.graph.node):
        raise LowbitError("internal: the multi-bit ONNX graph must not hold DequantizeLinear")
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return path


def multibit_onnx_ops(path: str | os.PathLike) -> dict[str, int]:
    """Count of each operator type in an ONNX file (to check what the graph is made of)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts

