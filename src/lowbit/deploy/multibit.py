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
from ..quant import dmbq
from ..quant.dmbq_quantizers import DmbqAct, DmbqWeight, is_dmbq
from ..quant.layers import out_channels, quant_layers
from ..quant.quantizer import ActQuantizer, WeightQuantizer
from ..quant.uniform import int_range
from ..record import QuantRecord, attach, publish
from .artifact import RUNTIME_CONFIG, _zoo_model, require_quantized
from .packing import pack_codes, packed_nbytes, unpack_codes

FORMAT = "lowbit-multibit"
DEFAULT_OPSET = 17  # plain float operators only: any opset ONNX Runtime runs
VERSION = "1"


def is_multibit_model(qmodel: Any) -> bool:
    """Whether a model holds DMBQ quantizers (and so exports through this module)."""
    return isinstance(qmodel, nn.Module) and any(is_dmbq(m) for m in qmodel.modules())


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
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    planes_blob: list[Tensor] = []
    codes: dict[int, list[Tensor]] = {}
    params: list[Tensor] = []
    rows = []
    for name in order:
        layer = layers[name]
        wq, aq = layer.weight_quant, layer.input_quant
        row: dict[str, Any] = {"name": name, "kind": layer.kind, "role": layer.role,
                               "shape": list(layer.weight.shape), "bias": layer.bias is not None}
        if isinstance(wq, DmbqWeight) and wq.enabled:
            if not wq.frozen:
                raise LowbitError(f"layer {name!r}: its DMBQ quantizer is still training (finish the QAT run)")
            planes, alpha = wq.levels_and_planes(layer.weight)
            bits = wq.channel_bits.tolist()
            signs = [p.reshape(-1) for p in planes if p.numel()]
            if signs:
                planes_blob.append(pack_codes((torch.cat(signs) > 0).to(torch.int64), 1, 0))
            params += [_flat(alpha[c, :b]) for c, b in enumerate(bits) if b]
            row["w"] = {"kind": "dmbq", "channel_bits": bits, "axis": wq.axis}
        elif wq.enabled:
            if not isinstance(wq, WeightQuantizer):
                raise LowbitError(f"layer {name!r}: its weight quantizer is still training (finish the QAT run)")
            q = wq.quantize(layer.weight).int_value
            if wq.binary:
                q = (q + 1) // 2 - 1
            qmin = int_range(wq.bits, wq.signed, wq.narrow)[0]
            codes.setdefault(wq.bits, []).append(pack_codes(q, wq.bits, qmin))
            params += [_flat(wq.scale), _flat(wq.zero_point)]
            row["w"] = {"kind": "uniform", "bits": wq.bits, "groups": wq.num_groups, "granularity": wq.granularity,
                        "symmetric": wq.symmetric, "narrow": wq.narrow, "axis": wq.axis}
        else:
            row["w"] = None
        if isinstance(aq, DmbqAct) and aq.enabled:
            params.append(_flat(aq.alpha))
            row["a"] = {"kind": "dmbq", "bits": aq.num_bases, "signed": aq.signed}
        elif aq.enabled:
            if not isinstance(aq, ActQuantizer):
                raise LowbitError(f"layer {name!r}: its input quantizer is still training (finish the QAT run)")
            params += [_flat(aq.scale), _flat(aq.zero_point)]
            row["a"] = {"kind": "uniform", "bits": aq.bits, "signed": aq.signed, "symmetric": aq.symmetric}
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
    config = {k: v for k, v in (info.get("config") or {}).items() if k not in RUNTIME_CONFIG}
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
        base = layer.weight_quant
        w = r["w"]
        if w is None:
            base.enabled = False
            handled.discard(f"{name}.weight")  # the float weight is an ordinary tensor of the file
        elif w["kind"] == "dmbq":
            bits = torch.tensor(w["channel_bits"], dtype=torch.int64)
            _check(bits.numel() == base.channels and bool(((bits >= 0) & (bits <= dmbq.MAX_BASES)).all()),
                   f"layer {name!r}: channel_bits must hold 0..{dmbq.MAX_BASES} for each of {base.channels} channels")
            q = DmbqWeight(base, 0)
            q.channel_bits.copy_(bits)
            n = layer.weight.numel() // base.channels
            total = int(bits.sum())
            signs = unpack_codes(planes.take(packed_nbytes(total * n, 1)), 1, 0, total * n) if total else None
            rows_w = torch.zeros(base.channels, n)
            pos = 0
            for c, b in enumerate(bits.tolist()):
                if b == 0:
                    continue
                alpha = params.take(b)
                q.alpha[c, :b] = alpha.to(q.alpha.device)
                plane = signs[pos:pos + b * n].view(b, n).float() * 2 - 1
                pos += b * n
                rows_w[c] = alpha @ plane
            q.frozen = True
            layer.weight_quant = q
            layer.weight.copy_(q.unrows(rows_w.to(layer.weight.device), layer.weight))
        elif w["kind"] == "uniform":
            wq = WeightQuantizer(w["bits"], base.channels, w["granularity"], w["groups"] if w["granularity"] == "group"
                                 else None, w["symmetric"], w["narrow"], axis=w["axis"]).to(layer.weight.device)
            _check(wq.num_groups == w["groups"], f"layer {name!r}: scale groups differ from the artifact's")
            wq.scale.copy_(params.take(wq.num_groups))
            wq.zero_point.copy_(params.take(wq.num_groups))
            reader = blobs.get(wq.bits)
            _check(reader is not None, f"layer {name!r}: no codes{wq.bits} blob")
            qmin = -1 if wq.binary else wq.qrange[0]
            c = unpack_codes(reader.take(packed_nbytes(layer.weight.numel(), wq.bits)), wq.bits, qmin,
                             layer.weight.numel()).to(layer.weight.device)
            if wq.binary:
                c = 2 * (c + 1) - 1
            layer.weight_quant = wq
            layer.weight.copy_(wq.dequantize(c.view_as(layer.weight).float()))
        else:
            raise LowbitError(f"layer {name!r}: unknown weight kind {w['kind']!r}")
        a = r["a"]
        aq = layer.input_quant
        if a is None:
            aq.enabled = False
        elif a["kind"] == "dmbq":
            act = DmbqAct(ActQuantizer(a["bits"]).to(layer.weight.device), a["bits"], bool(a["signed"]))
            act.alpha.copy_(params.take(a["bits"]).view(1, -1))
            act.initialized.fill_(True)
            act.frozen = True
            layer.input_quant = act
        elif a["kind"] == "uniform":
            aq.bits, aq.enabled, aq.signed, aq.symmetric = a["bits"], True, bool(a["signed"]), bool(a["symmetric"])
            aq.scale.copy_(params.take(1))
            aq.zero_point.copy_(params.take(1))
        else:
            raise LowbitError(f"layer {name!r}: unknown input kind {a['kind']!r}")
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
    """Export form of a DMBQ weight: ``sum_i alpha_i * float(B_i)`` from int8 sign planes."""

    def __init__(self, quant: DmbqWeight, weight: Tensor) -> None:
        super().__init__()
        planes, alpha = quant.levels_and_planes(weight)
        m = max(quant.bits, 1)
        n = quant.rows(weight).shape[1]
        stack = torch.zeros(m, quant.channels, n, dtype=torch.int8)  # a pruned channel: planes 0, alphas 0
        for c, p in enumerate(planes):
            stack[:p.shape[0], c] = p.cpu()
        moved = weight.movedim(quant.axis, 0) if quant.axis else weight
        shape = (m,) + tuple(moved.shape)
        planes_t = stack.view(shape)
        if quant.axis:
            planes_t = planes_t.movedim(1, quant.axis + 1)
        self.register_buffer("planes", planes_t.contiguous())
        a = alpha[:, :m].T.contiguous().float().cpu()  # (m, C)
        view = [m] + [1] * weight.dim()
        view[quant.axis + 1] = quant.channels
        self.register_buffer("alpha", a.view(view))

    def forward(self, w: Tensor) -> Tensor:
        return (self.planes.to(w.dtype) * self.alpha).sum(0)


class _StepAct(nn.Module):
    """Export form of a DMBQ input quantizer: ``L_0 + sum_k (L_k - L_(k-1)) * (x > t_k)``."""

    def __init__(self, quant: DmbqAct) -> None:
        super().__init__()
        lv = dmbq.levels(quant.alpha.float().cpu(), quant.signed)[0].sort().values
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
    for _, layer in quant_layers(twin):
        if isinstance(layer.weight_quant, DmbqWeight) and layer.weight_quant.enabled:
            layer.weight_quant = _PlaneWeight(layer.weight_quant, layer.weight)
        if isinstance(layer.input_quant, DmbqAct) and layer.input_quant.enabled:
            layer.input_quant = _StepAct(layer.input_quant)
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

