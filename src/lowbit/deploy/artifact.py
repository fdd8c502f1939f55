"""The lowbit artifact: packed integer weights + scales + manifest in one safetensors file.

Reading trusts nothing in the file: only safetensors and JSON are parsed (no pickle, no code), an
architecture is resolved by name through the zoo registry, and every manifest value and tensor is
checked before the model is built; a file that fails a check is a LowbitError naming it and the field.

Writing reads each layer through its ``quant.spec.LayerSpec`` (``quant.layer_specs``), never through
its quantizer; the file stores those specs (a table of code books plus one reference per row), and
loading rebuilds the quantizers from the specs (``graph.surgery.wrap_layer``). Version 5
holds every code book kind of ``quant.spec``: uniform (per-group widths included, each group's codes
at its own width and pruned groups without codes, see ``DENSE_VERSIONS``), sparse inputs, and
multibit (DMBQ) weights and inputs. Version 4 stored uniform per-group widths at the layer's widest
width. Files of versions 1 and 2 hold no spec records: their specs are derived from the rows and the
config; version 3 holds uniform and sparse code books only.
``lowbit-multibit`` files (DMBQ models written before version 4) are read through
``deploy.legacy_multibit``, which turns them into version-4 manifests.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..files import atomic_write
from ..graph.fold import apply_fold_structure
from ..graph.surgery import count_float_layers, execution_order, float_layers, wrap_layer
from ..layer_bits import LayerBits, default_bits, from_record
from ..layer_bits import record as layer_bits_record
from ..quant import spec as qspec
from ..quant.layer_specs import layer_specs
from ..quant.layers import LAYER_KINDS, layer_kind, out_channels, quant_layers
from ..quant.spec import LayerSpec, TensorSpec, effective_groups, storage_bits
from ..quant.uniform import int_range
from ..record import QuantRecord, attach, publish
from .blob_reader import BlobReader
from .packing import pack_codes, pack_rows, packed_nbytes, rows_nbytes, unpack_codes, unpack_rows

FORMAT = "lowbit-artifact"
VERSION = "5"
# version 1: one tensor per layer field and a verbose per-layer manifest; version 2: the compact rows
# without the per-layer spec records (``SPECS_KEY``), which are then derived from the rows and the config;
# version 3: uniform and sparse code books only (no ``PLANES_KEY`` blob); version 4: uniform weights with
# per-group widths (``group_bits``) stored every group at the row's w_bits (the widest), pruned ones too
READABLE_VERSIONS = ("1", "2", "3", "4", "5")
SPEC_VERSIONS = ("3", "4", "5")  # versions that store the layers' code books (SPECS_KEY)
MULTIBIT_VERSIONS = ("4", "5")  # versions that may hold multibit code books and the PLANES_KEY blob
# Version 5: a uniform weight with per-group widths (the manifest's ``group_bits``) stores each group's
# codes at its own width: its groups of width b, in order, are one byte-aligned run in ``codes<b>``
# (``packing.pack_rows``; groups along the weight's channel axis, ``quant.spec.group_rows``), pruned
# (0-bit) groups no codes. A group's codes are stored from the bottom of its own range (signed 1-bit
# groups, the binary pair {-1, +1}, as {0, 1}). Every group keeps its scale (a pruned group's scale is
# the unit of its channel's integer bias, see ``deploy.integer``), only unpruned groups a zero point
# (a pruned group's is 0 by definition, ``quant.spec``).
DENSE_VERSIONS = ("5",)
# Version 5 also writes per-group widths once and compactly (a model's channels run to thousands): the
# manifest's ``group_bits`` holds each layer's widths as a string of one WIDTH_DIGITS character per group,
# and a ``layer_bits`` entry whose per-channel widths are its row's group_bits says so with CHANNEL_BITS_REF
# (``[w_bits, a_bits, 1]``) instead of repeating them. Version 4 wrote both as lists of integers.
WIDTH_DIGITS = "0123456789abcdefg"  # widths 0..16
CHANNEL_BITS_REF = 1


def widths_text(widths: tuple[int, ...] | list[int]) -> str:
    """Per-group widths (0..16) as version 5's manifest holds them: one ``WIDTH_DIGITS`` character each."""
    return "".join(WIDTH_DIGITS[b] for b in widths)

# Columns of the manifest's "layers" rows (the manifest itself lists them under "fields"). "kind"
# (a quant.layers.LAYER_KINDS name: it fixes the weight layout and its channel axis) and "out" (output
# channels = bias length) are absent from older files: there they follow from the shape (4-D conv2d, else linear).
FIELDS = ("name", "role", "shape", "groups", "w_bits", "w", "zp", "bias", "a_bits", "a", "a_signed", "bn",
          "kind", "out")
# Documents the "params" blob inside the file, so that the format describes itself.
# (a multibit weight stores each channel's group_bits alphas, a multibit input its a_bits alphas)
# (with group_bits, zero points of the unpruned groups only: a pruned group's is 0)
PARAMS_LAYOUT = ("float32, layers in order: weight scale[groups] if w, weight zero point[unpruned groups] if zp, "
                 "bias[out] if bias, input scale and zero point if a; multibit: alphas[bases] instead")
PARAMS_KEY = "params"
# Version 4: one uint8 blob of the multibit (DMBQ) weights' sign planes, 1 bit per weight and base
# (1: b = +1), each layer's run byte-aligned; inside it channel by channel (pruned channels: nothing),
# each channel's group_bits planes one after the other, the plane of base i being bit i of the level index.
PLANES_KEY = "planes"
RUNTIME_CONFIG = ("device", "progress")  # settings of the run, not of the model: not stored
# Optional manifest key: layers whose input quantizer has sparse codes (``quant.sparse``: 0 up to a
# threshold, uniform levels above); the threshold is the float32 tensor ``<layer>.input_quant.threshold``.
SPARSE_KEY = "sparse_inputs"
# Version 3 stores every layer's spec (``quant.spec``) explicitly: a table of the distinct code books
# (``CODE_BOOKS_KEY``: one list of the ``CODE_BOOK_FIELDS`` of a ``TensorSpec`` record per code book,
# flags as 0/1; its layout along the layer follows from the row's kind, shape and groups, per-group
# widths from the manifest's ``group_bits``) and under
# ``SPECS_KEY`` two code book indices per row, in row order: its weight's and its input's (null: float). The numeric parameters are
# the row's tensors (params blob, thresholds by name). Stored specs must equal what the rows and the
# config say: a damaged one is refused, never used. A multibit code book (version 4) says which rows
# hold sign planes and alphas; its widths per channel (0: pruned) are the manifest's ``group_bits``.
SPECS_KEY = "specs"
CODE_BOOKS_KEY = "code_books"
CODE_BOOK_FIELDS = ("kind", "bits", "signed", "symmetric", "narrow", "granularity")
_CODE_BOOK_FLAGS = ("signed", "symmetric", "narrow")


def codes_key(bits: int) -> str:
    """Name of the blob holding every layer's packed ``bits``-wide weight codes."""
    return f"codes{bits}"


def is_reserved(key: str, version: str = VERSION) -> bool:
    """Whether ``key`` names one of the blobs of format ``version`` (``params``, ``codes<b>``, ``planes``)."""
    return (key == PARAMS_KEY or (key.startswith("codes") and key[5:].isdigit())
            or (key == PLANES_KEY and version in MULTIBIT_VERSIONS))


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


def group_offsets(spec: TensorSpec) -> tuple[list[int], list[bool]]:
    """Per group of a uniform weight with ``group_bits``: the bottom code of its own range, and whether
    it is a signed 1-bit (binary, {-1, +1}) group, whose codes are stored as {0, 1} (version 5)."""
    bottoms = [qspec.width_range(b, spec.signed, spec.narrow)[0] for b in spec.widths]
    binary = list(spec.binary_groups or (False,) * spec.num_groups)
    return bottoms, binary


def _dense_runs(spec: TensorSpec, weight: Tensor) -> dict[int, Tensor]:
    """A uniform weight's codes at every group's own width (version 5): one packed run per width."""
    rows = qspec.group_rows(spec, qspec.codes(spec, weight)).to(torch.int64)
    bottoms, binary = group_offsets(spec)
    low = torch.tensor(bottoms).unsqueeze(1)
    u = torch.where(torch.tensor(binary).unsqueeze(1), (rows + 1) // 2, rows - low)  # {-1, +1} -> {0, 1}
    return pack_rows(u, spec.widths)


def _sign_planes(spec: TensorSpec, weight: Tensor) -> Tensor | None:
    """A multibit weight's packed sign planes (``PLANES_KEY``); None when every channel is pruned."""
    q = qspec.codes(spec, weight)
    planes = qspec.bit_planes(spec, q)  # (bits, channels, n): a channel's first widths[c] planes are its own
    signs = [planes[:b, c].reshape(-1) for c, b in enumerate(spec.widths) if b]
    return pack_codes((torch.cat(signs) > 0).to(torch.int64), 1, 0) if signs else None


@torch.no_grad()
def save_artifact(qmodel: nn.Module, path: str | os.PathLike) -> Path:
    """Write packed weights, scales, zero points, bit widths and the manifest (safetensors).

    Layout: one uint8 blob ``codes<b>`` per weight bit width (each layer's codes packed densely,
    byte-aligned per layer; a layer with per-group widths puts its groups of each width in that
    width's blob, see ``DENSE_VERSIONS``), one uint8 blob ``planes`` (multibit weights' sign planes, see
    ``PLANES_KEY``), one float32 blob ``params`` (scales, zero points, alphas, biases, input
    quantizer parameters), every other tensor under its state-dict name, and a compact JSON
    manifest (architecture, config, method, input shape, one row per layer, the layers' code books
    and which row uses which) in the metadata.
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
    specs = {spec.name: spec for spec in layer_specs(qmodel)}
    config = {k: v for k, v in (info.get("config") or {}).items() if k not in RUNTIME_CONFIG}
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    codes: dict[int, list[Tensor]] = {}
    planes: list[Tensor] = []
    params: list[Tensor] = []
    rows = []
    for name in order:
        layer, spec = layers[name], specs[name]
        ws, xs = spec.weight, spec.input
        if ws is not None and ws.kind not in ("uniform", "multibit"):
            raise LowbitError(f"layer {name!r}: a {ws.kind} weight has no place in this format")
        store_zp = ws is not None and ws.kind == "uniform" and (not ws.symmetric or bool(ws.zero_point.any()))
        if ws is not None and ws.kind == "multibit":
            run = _sign_planes(ws, layer.weight.detach())
            if run is not None:
                planes.append(run)
            params += [_flat(ws.alphas[c, :b]) for c, b in enumerate(ws.widths) if b]  # pruned: nothing
            del state[f"{name}.weight"]
        elif ws is not None and ws.group_bits is not None:  # each group at its own width (version 5)
            for bits, run in _dense_runs(ws, layer.weight.detach()).items():
                codes.setdefault(bits, []).append(run)
            params.append(_flat(ws.scale))
            if store_zp:  # a pruned group's zero point is 0: not stored
                params.append(_flat(ws.zero_point)[torch.tensor(ws.group_bits) > 0])
            del state[f"{name}.weight"]
        elif ws is not None:
            q = qspec.codes(ws, layer.weight.detach())
            if ws.binary:
                q = (q + 1) // 2 - 1  # {-1, +1} -> {-1, 0}: one bit each
            codes.setdefault(ws.bits, []).append(pack_codes(q, ws.bits, _weight_qmin(ws.bits, ws.signed, ws.narrow)))
            params.append(_flat(ws.scale))
            if store_zp:
                params.append(_flat(ws.zero_point))
            del state[f"{name}.weight"]
        if layer.bias is not None:
            params.append(_flat(layer.bias))
        if xs is not None:
            params += [_flat(xs.alphas)] if xs.kind == "multibit" else [_flat(xs.scale), _flat(xs.zero_point)]
        for key in ("bias", "weight_quant.scale", "weight_quant.zero_point", "input_quant.scale",
                    "input_quant.zero_point"):
            state.pop(f"{name}.{key}", None)
        for part, quantizer in ((ws, "weight_quant"), (xs, "input_quant")):
            if part is not None and part.kind == "multibit":  # its spec is all of it: no buffer of its own is stored
                for key in [k for k in state if k.startswith(f"{name}.{quantizer}.")]:
                    del state[key]
        # a float weight or input has no spec: its columns take the config's values (they are not read)
        channels = spec.weight_shape[LAYER_KINDS[spec.kind].axis]
        groups = ws.num_groups if ws is not None else effective_groups(channels, config.get("granularity", "channel"),
                                                                       config.get("groups"))
        rows.append([name, spec.role, list(spec.weight_shape), groups, ws.bits if ws else config.get("w_bits"),
                     int(ws is not None), int(store_zp), int(layer.bias is not None),
                     xs.bits if xs else config.get("a_bits"), int(xs is not None), int(bool(xs and xs.signed)),
                     bn_of.get(name), spec.kind, spec.out_channels])
    tensors: dict[str, Tensor] = {codes_key(b): torch.cat(c) for b, c in sorted(codes.items())}
    if planes:
        tensors[PLANES_KEY] = torch.cat(planes)
    if params:
        tensors[PARAMS_KEY] = torch.cat(params)
    for key, value in state.items():
        if is_reserved(key):
            raise LowbitError(f"the model has a tensor named {key!r}, a name the artifact format reserves")
        tensors[key] = value.contiguous().float() if value.is_floating_point() else value.contiguous()
    manifest = {"arch": info.get("arch"), "method": info.get("method"), "config": config,
                "options": info.get("options") or {}, "input_shape": info.get("input_shape"),
                "params": PARAMS_LAYOUT, "fields": list(FIELDS), "layers": rows}
    if other_pairs:
        manifest["fold_pairs"] = other_pairs
    sparse = [r[0] for r in rows if specs[r[0]].input is not None and specs[r[0]].input.kind == "sparse"]
    if sparse:  # TSQ's sparse input codes: each threshold is stored as <layer>.input_quant.threshold
        manifest[SPARSE_KEY] = sparse
    if info.get("layer_bits"):  # the resolved per-layer widths, one [w, a] (null: float) per row: checked at load
        resolved = from_record(info["layer_bits"], "lowbit_info layer_bits")
        manifest["layer_bits"] = [compact_layer_bits(resolved.get(r[0]), specs[r[0]].weight) for r in rows]
    group_bits = {name: widths_text(specs[name].weight.group_bits) for name in order
                  if specs[name].weight is not None and specs[name].weight.group_bits}
    if group_bits:  # widths inside a layer (uniform: each group's codes at its own width, see DENSE_VERSIONS;
        manifest["group_bits"] = group_bits  # multibit: each channel's bases, 0 for a pruned channel)
    books: dict[str, int] = {}
    refs = []
    for name in order:  # each row's code books, as indices into the table of distinct ones
        row_refs = []
        for part in (specs[name].weight, specs[name].input):
            if part is None:
                row_refs.append(None)
                continue
            meta = part.to_record()[0]
            book = [int(meta[f]) if f in _CODE_BOOK_FLAGS else meta[f] for f in CODE_BOOK_FIELDS]
            row_refs.append(books.setdefault(json.dumps(book), len(books)))
        refs += row_refs
    manifest[CODE_BOOKS_KEY] = [json.loads(b) for b in books]
    manifest[SPECS_KEY] = refs
    metadata = {"format": FORMAT, "version": VERSION, "manifest": json.dumps(manifest, separators=(",", ":"))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


# ---------------------------------------------------------------- reading: nothing in the file is trusted
#
# Every manifest value and every tensor is checked before anything is built from it, by the small
# checks below, each raising a LowbitError that names the field (read_artifact and load_artifact add
# the file). A manifest row is checked field by field (ROW_CHECKS), then across its fields and
# against the config (_check_row), then its tensors (_check_layer_tensors); load_artifact checks what
# needs the model (names, shapes, groups, fold pairs, the other tensors, the execution order).

ROLES = ("first", "last", "only", "body", "unused")  # as layer_bits.roles_of gives them
# Config fields that say how the stored numbers are read: a file must hold them (no silent default).
CONFIG_REQUIRED = ("w_bits", "a_bits", "first_last_bits", "granularity", "groups", "w_symmetric", "w_narrow",
                   "a_symmetric")
MAX_INPUT_ELEMENTS = 2 ** 26  # input_shape drives one forward pass at load: refuse absurd sizes
# Keys of a version-1 layer entry (the expanded view ``_spec`` builds).
V1_SPEC_KEYS = frozenset({"kind", "role", "weight_shape", "w_enabled", "w_bits", "w_signed", "w_symmetric", "w_narrow",
                          "granularity", "num_groups", "w_qmin", "w_binary", "a_enabled", "a_bits", "a_signed",
                          "a_symmetric"})


def _show(value: Any) -> str:
    """``repr`` of a value read from a file, cut short (a tampered value may be huge)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(field: str, expected: str, value: Any) -> LowbitError:
    return LowbitError(f"{field} must be {expected}, got {_show(value)}")


def _damaged(key: str, detail: str) -> LowbitError:
    return LowbitError(f"the manifest's {key!r} is missing or damaged: {detail}")


def _required(stored: dict, key: str) -> Any:
    if key not in stored:
        raise _damaged(key, "the key is absent")
    return stored[key]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false are not numbers here


def _positive(value: Any, field: str) -> int:
    if not _is_int(value) or value < 1:
        raise _bad(field, "a positive integer", value)
    return value


def _bits(value: Any, field: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not _is_int(value) or not 1 <= value <= 16:
        raise _bad(field, "an integer 1..16" + (" or null" if optional else ""), value)
    return value


def _bases(value: Any, field: str, low: int = 0) -> int:
    """Bases of a multibit code book: ``low`` .. ``quant.spec.MAX_BASES`` (0: every channel pruned)."""
    if not _is_int(value) or not low <= value <= qspec.MAX_BASES:
        raise _bad(field, f"an integer {low}..{qspec.MAX_BASES} (bases of a multibit code book)", value)
    return value


def _flag(value: Any, field: str) -> int:
    if not _is_int(value) or value not in (0, 1):
        raise _bad(field, "0 or 1", value)
    return value


def _name(value: Any, field: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(field, "a module name" + (" or null" if optional else ""), value)
    return value


def _kind(value: Any, field: str) -> str:
    if not isinstance(value, str) or value not in LAYER_KINDS:
        raise _bad(field, f"one of {', '.join(sorted(LAYER_KINDS))}", value)
    return value


def _role(value: Any, field: str) -> str:
    if not isinstance(value, str) or value not in ROLES:
        raise _bad(field, f"one of {', '.join(ROLES)}", value)
    return value


def _shape(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(_is_int(d) and d >= 1 for d in value):
        raise _bad(field, "a non-empty list of positive integers", value)
    return value


# How each column of a manifest row is checked on its own (FIELDS order); a multibit weight's or
# input's width is a number of bases instead (MULTIBIT_CHECKS).
ROW_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "name": _name, "role": _role, "shape": _shape, "groups": _positive, "w_bits": _bits, "w": _flag, "zp": _flag,
    "bias": _flag, "a_bits": functools.partial(_bits, optional=True), "a": _flag, "a_signed": _flag,
    "bn": functools.partial(_name, optional=True), "kind": _kind, "out": _positive,
}
assert set(ROW_CHECKS) == set(FIELDS)
MULTIBIT_CHECKS: dict[str, Callable[[Any, str], Any]] = {"w_bits": _bases, "a_bits": functools.partial(_bases, low=1)}
# Columns added after version 2 first shipped: a file without them holds Conv2d and Linear layers
# only, whose kind and output channels follow from the weight's shape (_fill_optional).
OPTIONAL_FIELDS = ("kind", "out")
REQUIRED_FIELDS = tuple(f for f in FIELDS if f not in OPTIONAL_FIELDS)
LEGACY_KINDS = {"conv": "conv2d", "linear": "linear"}  # version-1 spec names


def _fill_optional(row: dict) -> None:
    """Kind and output channels for a row written before those columns existed."""
    if "kind" not in row:
        row["kind"] = "conv2d" if isinstance(row.get("shape"), list) and len(row["shape"]) == 4 else "linear"
    if "out" not in row:
        shape = row.get("shape")
        row["out"] = shape[0] if isinstance(shape, list) and shape else None


def _scale_channels(row: dict) -> int:
    """Channels along the weight's scale axis (the output channels; out/groups for ConvTranspose)."""
    return row["shape"][LAYER_KINDS[row["kind"]].axis]


def _out_channels(row: dict) -> int:
    """Output channels of a row's layer, which the bias follows."""
    return row["out"]


def _check_kind_shape(row: dict) -> None:
    """The weight's rank and the output channels must fit the row's layer kind."""
    kind = LAYER_KINDS[row["kind"]]
    shape, out = row["shape"], row["out"]
    if len(shape) != kind.spatial + 2:
        raise _bad("shape", f"a {kind.spatial + 2}-D weight shape for a {kind.name} layer", shape)
    per_axis = shape[kind.axis]
    if out % per_axis or (not kind.transposed and out != per_axis):
        raise _bad("out", f"output channels that fit a {kind.name} weight of shape {shape}", out)


def _protocol_bits(role: str, cfg: QuantConfig) -> LayerBits:
    """Widths ``graph.surgery.declare`` gives a layer of ``role`` under ``cfg`` without user entries
    (files written before the resolved per-layer map was stored)."""
    return default_bits(role, cfg.w_bits, cfg.a_bits, cfg.first_last_bits, cfg.quantize_input)


def _check_row_bits(row: dict, cfg: QuantConfig, bits: LayerBits | None) -> None:
    """A row's widths against the file's resolved per-layer map (``bits``), or, in files without one,
    against the config's first/last protocol. A multibit weight's w_bits (its most bases) is not
    compared: LBA moves bases between channels and layers under the layer's recorded width."""
    role = row["role"]
    if bits is not None:  # the map is explicit: which quantizers are on and their widths must match it
        said = "as the artifact's layer_bits say"
        if row["w"] != int(bits.enabled):
            raise _bad("w", f"{int(bits.enabled)} (weights {'quantized' if bits.enabled else 'float'}) {said}", row["w"])
        if row["w"] and not row["w_multibit"] and row["w_bits"] != bits.w_bits:
            raise _bad("w_bits", f"{bits.w_bits} for a {role!r} layer {said}", row["w_bits"])
        if row["a"] != int(bits.a_bits is not None):
            raise _bad("a", f"{int(bits.a_bits is not None)} (input {'float' if bits.a_bits is None else 'quantized'}) "
                       f"{said}", row["a"])
        if row["a"] and row["a_bits"] != bits.a_bits:
            raise _bad("a_bits", f"{bits.a_bits} for a {role!r} layer {said}", row["a_bits"])
        return
    expected = _protocol_bits(row["role"], cfg)
    w_bits = expected.w_bits if expected.w_bits is not None else cfg.w_bits
    a_bits = expected.a_bits if expected.a_bits is not None else cfg.a_bits
    if row["w"] and not row["w_multibit"] and row["w_bits"] != w_bits:
        raise _bad("w_bits", f"{w_bits} for a {role!r} layer (config w_bits={cfg.w_bits}, "
                   f"first_last_bits={cfg.first_last_bits})", row["w_bits"])
    if row["a"] and row["a_bits"] != a_bits:
        raise _bad("a_bits", f"{a_bits} for a {role!r} layer (config a_bits={cfg.a_bits}, "
                   f"first_last_bits={cfg.first_last_bits})", row["a_bits"])


def _check_row_fields(row: dict, cfg: QuantConfig, bits: LayerBits | None = None) -> None:
    """The fields of one checked row against each other, the config and the layer's resolved widths."""
    _check_kind_shape(row)
    channels, groups, role = _scale_channels(row), row["groups"], row["role"]
    if row["w_multibit"]:  # a multibit weight has its alphas per channel, whatever the config's granularity
        if groups != channels:
            raise _bad("groups", f"{channels}, one per output channel (a multibit weight)", groups)
        if row["zp"]:
            raise _bad("zp", "0 for a multibit weight (it has no zero points)", row["zp"])
    elif bits is not None and bits.channel_bits is not None:  # per-channel widths force per-channel scales
        # (empty: widths still to come from the row's group_bits, version 5's CHANNEL_BITS_REF)
        if groups != channels or (bits.channel_bits and len(bits.channel_bits) != channels):
            raise _bad("groups", f"{channels}, one per output channel (the layer has per-channel widths)", groups)
    elif cfg.granularity == "tensor" and groups != 1:
        raise _bad("groups", "1 (per-tensor scales in the config)", groups)
    elif cfg.granularity == "channel" and groups != channels:
        raise _bad("groups", f"{channels}, one per output channel (per-channel scales in the config)", groups)
    elif cfg.granularity == "group" and (channels % groups or groups > cfg.groups):
        raise _bad("groups", f"a divisor of the {channels} output channels not above the config's groups "
                   f"({cfg.groups})", groups)
    if role == "unused" and (row["w"] or row["a"]):
        raise LowbitError(f"a layer with role 'unused' has no active quantizer, got w={row['w']}, a={row['a']}")
    if row["zp"] and not row["w"]:
        raise _bad("zp", "0 when the weights are not quantized (w is 0)", row["zp"])
    if row["w"] and not row["zp"] and not cfg.w_symmetric and not row["w_multibit"]:
        raise _bad("zp", "1: the config's weights are asymmetric (w_symmetric false) and need zero points", 0)
    if row["a"] and row["a_bits"] is None:
        raise _bad("a_bits", "an integer 1..16 when the input is quantized (a is 1)", None)
    if row["a_signed"] and not row["a_multibit"] and not (cfg.a_symmetric and row["a_bits"] is not None
                                                          and row["a_bits"] > 1):
        raise _bad("a_signed", f"0: signed input codes need a_symmetric and more than 1 bit (config a_symmetric="
                   f"{cfg.a_symmetric}, a_bits={row['a_bits']})", 1)
    _check_row_bits(row, cfg, bits)


def _check_row(row: dict, cfg: QuantConfig, where: str, bits: LayerBits | None = None,
               multibit: tuple[bool, bool] = (False, False)) -> dict:
    """A manifest row with every field checked on its own, across fields and against the config.

    ``multibit``: whether its code books (version 4) make its weight and its input multibit; the
    checked row says so under ``w_multibit`` and ``a_multibit``.
    """
    name = row.get("name")
    prefix = f"layer {name!r}" if isinstance(name, str) and name else where
    _fill_optional(row)
    row["w_multibit"], row["a_multibit"] = multibit
    try:
        for field, check in ROW_CHECKS.items():
            if field in MULTIBIT_CHECKS and row[f"{field[0]}_multibit"]:  # w_bits, a_bits
                check = MULTIBIT_CHECKS[field]
            row[field] = check(row[field], field)
        _check_row_fields(row, cfg, bits)
    except LowbitError as exc:
        raise LowbitError(f"{prefix}: {exc}") from None
    return row


def _spec(row: dict, cfg: QuantConfig) -> dict:
    """The expanded per-layer view of a checked row (what read_artifact returns under ``layers``)."""
    shape, bits = row["shape"], row["w_bits"]
    view = {
        "kind": row["kind"], "out_channels": row["out"], "role": row["role"], "weight_shape": shape,
        "w_enabled": bool(row["w"]), "w_bits": bits, "w_signed": cfg.w_symmetric,
        "w_symmetric": cfg.w_symmetric, "w_narrow": cfg.w_narrow, "granularity": cfg.granularity,
        "num_groups": row["groups"], "w_qmin": None, "w_binary": cfg.w_symmetric and bits == 1,
        "a_enabled": bool(row["a"]), "a_bits": row["a_bits"], "a_signed": bool(row["a_signed"]),
        "a_symmetric": cfg.a_symmetric,
    }
    if row.get("w_multibit"):  # bases of +-1 signs scaled per channel: no integer grid, no qmin
        view.update(w_signed=True, w_symmetric=True, w_narrow=False, granularity="channel", w_binary=False)
    else:
        view["w_qmin"] = _weight_qmin(bits, cfg.w_symmetric, cfg.w_narrow)
    return view


def _config(data: Any) -> QuantConfig:
    """The QuantConfig a manifest's ``config`` describes, validated (field types included) by QuantConfig."""
    if not isinstance(data, dict):
        raise _damaged("config", f"it must be an object of QuantConfig fields, got {_show(data)}")
    missing = [k for k in CONFIG_REQUIRED if k not in data]
    if missing:
        raise _damaged("config", f"it lacks {missing}, which say how the stored numbers are read")
    fields = {k: v for k, v in data.items() if k not in RUNTIME_CONFIG}
    if fields.get("granularity") != "group" and isinstance(fields.get("groups"), int):
        fields["groups"] = None  # files written before QuantConfig refused it may hold it; it plays no part
    try:
        return QuantConfig.from_dict(fields)
    except (LowbitError, TypeError, ValueError, OverflowError) as exc:
        raise LowbitError(f"config: {exc}") from None


def _check_header(stored: dict) -> dict:
    """The manifest's record fields (arch, method, config, options, input_shape), checked."""
    arch = stored.get("arch")
    if arch is not None and not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and arch["name"]
                                 and isinstance(arch.get("kwargs", {}), dict)):
        raise _bad("arch", 'null or {"name": <zoo model name>, "kwargs": {...}}', arch)
    for key in ("method", "params"):
        if stored.get(key) is not None and not isinstance(stored[key], str):
            raise _bad(key, "a string", stored[key])
    if stored.get("options") is not None and not isinstance(stored["options"], dict):
        raise _bad("options", "an object (the method's options)", stored["options"])
    shape = stored.get("input_shape")
    if shape is not None and math.prod(_shape(shape, "input_shape")) > MAX_INPUT_ELEMENTS:
        raise _bad("input_shape", f"one network input of at most {MAX_INPUT_ELEMENTS} values", shape)
    return {"arch": arch, "method": stored.get("method"), "config": stored["config"], "options": stored.get("options"),
            "input_shape": shape}


def _pairs(value: Any, field: str) -> list[list[str]]:
    if not isinstance(value, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) and n for n in p) for p in value):
        raise _bad(field, "a list of [conv, bn] module name pairs", value)
    return value


def _check_pairs(pairs: list[list[str]]) -> None:
    """A module folds at most once: each conv into one BN, each BN into one conv."""
    seen: set[str] = set()
    for pair in pairs:
        for name in pair:
            if name in seen:
                raise LowbitError(f"fold pairs: {name!r} appears in more than one [conv, bn] pair")
            seen.add(name)


def _check_roles(rows: list[dict]) -> None:
    """Rows list the called layers in execution order, then the unused ones: roles follow from the order."""
    used = [r for r in rows if r["role"] != "unused"]
    if any(r["role"] == "unused" for r in rows[:len(used)]):
        raise LowbitError("layer rows must list the called layers first (in execution order), then the unused ones")
    n = len(used)
    expected = [] if n == 0 else ["only"] if n == 1 else ["first"] + ["body"] * (n - 2) + ["last"]
    for i, (row, role) in enumerate(zip(used, expected)):
        if row["role"] != role:
            raise LowbitError(f"layer {row['name']!r}: role must be {role!r} (called layer {i + 1} of {n}), "
                              f"got {row['role']!r}")


def _tensor(tensors: dict[str, Tensor], key: str, dtype: torch.dtype, shape: list[int]) -> Tensor:
    value = tensors.get(key)
    if value is None:
        raise LowbitError(f"tensor {key!r} is missing")
    if value.dtype != dtype or list(value.shape) != shape:
        raise LowbitError(f"tensor {key!r} must be {dtype} of shape {shape}, got {value.dtype} of shape "
                          f"{list(value.shape)}")
    return value


def _refuse_values(value: Tensor, bad: Tensor, field: str, expected: str) -> None:
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise LowbitError(f"{field} must be {expected}, got {value[i].item()!r} at index {i}")


def _finite(value: Tensor, field: str) -> None:
    _refuse_values(value.reshape(-1), ~torch.isfinite(value.reshape(-1)), field, "finite")


def _check_scale(value: Tensor, field: str, codes: int) -> None:
    """Finite, positive, and small enough that ``codes`` steps stay finite in float32."""
    _refuse_values(value, ~(torch.isfinite(value * codes) & (value > 0)), field,
                   f"finite and > 0 (with {codes} steps still finite in float32)")


def _check_zero_point(value: Tensor, field: str, qrange: tuple[int, int]) -> None:
    lo, hi = qrange
    _refuse_values(value, ~(torch.isfinite(value) & (value == value.round()) & (value >= lo) & (value <= hi)),
                   field, f"integers in the code range [{lo}, {hi}]")


def _check_layer_tensors(row: dict, tensors: dict[str, Tensor], cfg: QuantConfig) -> None:
    """Dtype, shape and values of one layer's codes, scales, zero points, alphas and bias (a multibit
    weight's planes are cut from their blob at the length its widths give)."""
    name, groups, f32 = row["name"], row["groups"], torch.float32
    if row["w"] and row["w_multibit"]:
        _finite(_tensor(tensors, f"{name}.weight_quant.alphas", f32, [groups, row["w_bits"]]), "weight_quant.alphas")
    elif row["w"]:
        bits = row["w_bits"]
        _tensor(tensors, f"{name}.weight.codes", torch.uint8, [packed_nbytes(math.prod(row["shape"]), bits)])
        qmin, qmax = int_range(bits, cfg.w_symmetric, cfg.w_narrow)
        _check_scale(_tensor(tensors, f"{name}.weight_quant.scale", f32, [groups]), "weight_quant.scale", qmax - qmin)
        _check_zero_point(_tensor(tensors, f"{name}.weight_quant.zero_point", f32, [groups]),
                          "weight_quant.zero_point", (qmin, qmax))
    if row["bias"]:
        _finite(_tensor(tensors, f"{name}.bias", f32, [_out_channels(row)]), "bias")
    if row["a"] and row["a_multibit"]:
        _finite(_tensor(tensors, f"{name}.input_quant.alphas", f32, [1, row["a_bits"]]), "input_quant.alphas")
    elif row["a"]:
        qmin, qmax = int_range(row["a_bits"], bool(row["a_signed"]))
        _check_scale(_tensor(tensors, f"{name}.input_quant.scale", f32, [1]), "input_quant.scale", qmax - qmin)
        _check_zero_point(_tensor(tensors, f"{name}.input_quant.zero_point", f32, [1]), "input_quant.zero_point",
                          (qmin, qmax))


def _check_tensors(rows: list[dict], tensors: dict[str, Tensor], cfg: QuantConfig) -> None:
    for row in rows:
        try:
            _check_layer_tensors(row, tensors, cfg)
        except LowbitError as exc:
            raise LowbitError(f"layer {row['name']!r}: {exc}") from None


def compact_layer_bits(bits: LayerBits | None, weight: TensorSpec | None = None) -> list[Any] | None:
    """A row's resolved widths in the manifest: ``[w_bits, a_bits]`` (``[w_bits, a_bits, channel_bits]``
    with per-channel widths, ``[w_bits, a_bits, CHANNEL_BITS_REF]`` when they are the uniform ``weight``
    spec's group_bits, which the manifest holds already), or null for a float layer."""
    if bits is None:
        raise LowbitError("the model's lowbit_info layer_bits lack an entry for one of its layers")
    if not bits.enabled:
        return None
    if bits.channel_bits is None:
        return [bits.w_bits, bits.a_bits]
    same = weight is not None and weight.kind == "uniform" and weight.group_bits == tuple(bits.channel_bits)
    return [bits.w_bits, bits.a_bits, CHANNEL_BITS_REF if same else list(bits.channel_bits)]


def _layer_bits(stored: dict, version: str = VERSION) -> tuple[list[LayerBits] | None, set[int]]:
    """The manifest's resolved widths, one per layer row (None in files written before they were stored),
    and the rows whose per-channel widths are their group_bits (``CHANNEL_BITS_REF``, version 5: their
    LayerBits come back with empty channel_bits, which ``_expand`` fills in from the checked group_bits)."""
    refs: set[int] = set()
    if "layer_bits" not in stored:
        return None, refs
    value, layers = stored["layer_bits"], stored.get("layers")
    if not isinstance(layers, list) or not layers:
        return None, refs  # _rows reports the damaged rows
    if not isinstance(value, list) or len(value) != len(layers):
        raise _damaged("layer_bits", f"it must be a list with one entry per layer row, got {_show(value)}")
    out = []
    for i, entry in enumerate(value):
        if entry is None:
            bits = LayerBits(None, None)
        elif (version in DENSE_VERSIONS and isinstance(entry, list) and len(entry) == 3 and _is_int(entry[0])
              and 1 <= entry[0] <= 16 and (entry[1] is None or (_is_int(entry[1]) and 1 <= entry[1] <= 16))
              and _is_int(entry[2]) and entry[2] == CHANNEL_BITS_REF):
            bits = LayerBits(entry[0], entry[1], ())  # per channel; the widths follow from group_bits
            refs.add(i)
        elif (isinstance(entry, list) and len(entry) in (2, 3) and _is_int(entry[0]) and 1 <= entry[0] <= 16
              and (entry[1] is None or (_is_int(entry[1]) and 1 <= entry[1] <= 16))
              and (len(entry) == 2 or (isinstance(entry[2], list) and entry[2]
                                       and all(type(b) is int and 0 <= b <= 16 for b in entry[2])
                                       and max(entry[2]) > 0 and storage_bits(entry[2]) == entry[0]))):
            bits = LayerBits(entry[0], entry[1], tuple(entry[2]) if len(entry) == 3 else None)
        else:
            raise _bad(f"layer_bits[{i}]", "null (a float layer) or [w_bits 1..16, a_bits 1..16 or null] "
                       "(+ per-channel widths 0..16 stored at w_bits" +
                       (f", or {CHANNEL_BITS_REF}: the row's group_bits)" if version in DENSE_VERSIONS else ")"), entry)
        out.append(bits)
    return out, refs


def _group_bits(value: Any, rows: list[dict], version: str = VERSION) -> dict[str, list[int]]:
    """Per-group widths of mixed-width layers: one list per named quantized layer (version 5: a string
    of ``WIDTH_DIGITS``, decoded here). Uniform codes: widths 0..w_bits (0: pruned), stored at w_bits
    (``quant.spec.storage_bits``); multibit: bases 0..w_bits (0: a pruned channel), the most = w_bits."""
    if not isinstance(value, dict) or not value:
        raise _damaged("group_bits", f"it must be a non-empty object of per-layer width lists, got {_show(value)}")
    by_name = {r["name"]: r for r in rows}
    text = version in DENSE_VERSIONS
    decoded = {}
    for name, widths in value.items():
        row = by_name.get(name)
        if row is None or not row["w"]:
            raise _damaged("group_bits", f"{_show(name)} is not a layer with quantized weights")
        if text:
            if not isinstance(widths, str) or not set(widths) <= set(WIDTH_DIGITS):
                raise _bad(f"group_bits[{name!r}]", f"a string of one width per group, each of {WIDTH_DIGITS!r} "
                           "(0..16)", widths)
            widths = [WIDTH_DIGITS.index(c) for c in widths]
        decoded[name] = widths
        ints = (isinstance(widths, list) and len(widths) == row["groups"] and bool(widths)
                and all(type(b) is int and 0 <= b <= row["w_bits"] for b in widths))
        if row["w_multibit"]:
            if not ints or max(widths) != row["w_bits"]:
                raise _bad(f"group_bits[{name!r}]", f"a list of {row['groups']} integers from 0 to {row['w_bits']} "
                           f"(the layer's w_bits) reaching {row['w_bits']}", widths)
        elif not ints or max(widths) == 0 or storage_bits(widths) != row["w_bits"]:
            raise _bad(f"group_bits[{name!r}]", f"a list of {row['groups']} integers from 0 to {row['w_bits']} "
                       f"(the layer's w_bits) stored at {row['w_bits']}", widths)
    return decoded


def _rows(stored: dict, cfg: QuantConfig, layer_bits: list[LayerBits] | None = None,
          version: str = VERSION) -> list[dict]:
    """The compact manifest's layer rows as checked dicts (against the resolved widths where stored;
    version 4: with which of their weights and inputs are multibit)."""
    fields = _required(stored, "fields")
    if (not isinstance(fields, list) or not all(isinstance(f, str) for f in fields)
            or sorted(fields) not in (sorted(FIELDS), sorted(REQUIRED_FIELDS))):  # each column once
        raise _damaged("fields", f"it must name each of the columns {list(FIELDS)} once (files written before "
                       f"{list(OPTIONAL_FIELDS)} existed: all but those), got {_show(fields)}")
    layers = _required(stored, "layers")
    if not isinstance(layers, list) or not layers:
        raise _damaged("layers", f"it must be a non-empty list of rows, got {_show(layers)}")
    multibit = _multibit_parts(stored, len(layers)) if version in MULTIBIT_VERSIONS else [(False, False)] * len(layers)
    rows = []
    for i, row in enumerate(layers):
        if not isinstance(row, list) or len(row) != len(fields):
            raise LowbitError(f"layers[{i}] must be a list of {len(fields)} values (one per field), got {_show(row)}")
        bits = None if layer_bits is None else layer_bits[i]
        rows.append(_check_row(dict(zip(fields, row)), cfg, f"layers[{i}]", bits, multibit[i]))
    names = [r["name"] for r in rows]
    if len(set(names)) != len(names):
        raise LowbitError(f"layer {next(n for n in names if names.count(n) > 1)!r} has more than one row")
    return rows


def _expand(stored: dict, tensors: dict[str, Tensor], version: str = VERSION) -> tuple[dict, dict[str, Tensor]]:
    """The compact (version 2 to 5) manifest and blobs as one spec and named tensors per layer, all checked.

    Version 5's per-group-width codes come back as version 4 holds them (``<layer>.weight.codes``
    packed at the row's w_bits), each group's codes checked against its own range on the way.
    """
    cfg = _config(_required(stored, "config"))
    header = _check_header(stored)
    layer_bits, refs = _layer_bits(stored, version)
    rows = _rows(stored, cfg, layer_bits, version)
    pairs = [[r["name"], r["bn"]] for r in rows if r["bn"]] + _pairs(stored.get("fold_pairs", []), "fold_pairs")
    _check_pairs(pairs)
    if header["input_shape"] is not None:  # written by lowbit.quantize / qat: rows in execution order
        _check_roles(rows)
    group_bits = _group_bits(stored["group_bits"], rows, version) if "group_bits" in stored else {}
    for i in sorted(refs):  # per-channel widths given as the row's group_bits (CHANNEL_BITS_REF)
        r, bits = rows[i], layer_bits[i]
        if r["name"] not in group_bits or r["w_multibit"]:
            raise _bad(f"layer_bits[{i}]", "per-channel widths of a layer with uniform weights and group_bits per "
                       "output channel", [bits.w_bits, bits.a_bits, CHANNEL_BITS_REF])
        layer_bits[i] = LayerBits(bits.w_bits, bits.a_bits, tuple(group_bits[r["name"]]))
    params = BlobReader(tensors.pop(PARAMS_KEY, None), PARAMS_KEY, torch.float32)
    dense = {r["name"]: group_bits[r["name"]] for r in rows if version in DENSE_VERSIONS and r["w"]
             and not r["w_multibit"] and r["name"] in group_bits}  # codes at each group's own width
    widths = {b for r in rows if r["w"] and not r["w_multibit"] for b in dense.get(r["name"], [r["w_bits"]]) if b}
    blobs = {}
    for bits in sorted(widths):
        if codes_key(bits) not in tensors:
            raise LowbitError(f"the artifact has no {codes_key(bits)} blob for its {bits}-bit layers")
        blobs[bits] = BlobReader(tensors.pop(codes_key(bits)), codes_key(bits), torch.uint8)
    if version in MULTIBIT_VERSIONS:
        blobs[PLANES_KEY] = BlobReader(tensors.pop(PLANES_KEY, None), PLANES_KEY, torch.uint8)
    if any(is_reserved(k, version) for k in tensors):
        raise LowbitError(f"the artifact holds weight codes that no layer of its manifest uses "
                          f"({sorted(k for k in tensors if is_reserved(k, version))})")
    out: dict[str, Tensor] = {}
    owned: set[str] = set()  # every name a row's values go under: no other tensor may claim one
    for r in rows:
        name, shape, groups, bits = r["name"], r["shape"], r["groups"], r["w_bits"]
        owned |= {f"{name}.{key}" for key in ("weight.codes", "weight.planes", "bias", "weight_quant.scale",
                                               "weight_quant.zero_point", "weight_quant.alphas", "input_quant.scale",
                                               "input_quant.zero_point", "input_quant.alphas")}
        if r["w"] and r["w_multibit"]:  # each channel's planes and alphas, pruned channels nothing
            owned.add(f"{name}.weight")
            widths = group_bits.get(name, [bits] * groups)
            total = sum(widths)
            per_channel = math.prod(shape) // groups
            out[f"{name}.weight.planes"] = blobs[PLANES_KEY].take(packed_nbytes(total * per_channel, 1))
            alphas = torch.zeros(groups, bits)
            for c, values in enumerate(params.take(total).split(widths)):
                alphas[c, :len(values)] = values
            out[f"{name}.weight_quant.alphas"] = alphas
        elif r["w"] and name in dense:
            owned.add(f"{name}.weight")
            per_group = math.prod(shape) // groups
            runs = {b: blobs[b].take(n) for b, n in rows_nbytes(per_group, dense[name]).items()}
            out[f"{name}.weight.codes"] = _storage_codes(r, cfg, dense[name], runs)
            out[f"{name}.weight_quant.scale"] = params.take(groups)
            unpruned = torch.tensor(dense[name]) > 0
            zero_point = torch.zeros(groups)
            if r["zp"]:  # stored for the unpruned groups only: a pruned group's is 0
                zero_point[unpruned] = params.take(int(unpruned.sum()))
            out[f"{name}.weight_quant.zero_point"] = zero_point
        elif r["w"]:
            owned.add(f"{name}.weight")
            out[f"{name}.weight.codes"] = blobs[bits].take(packed_nbytes(math.prod(shape), bits))
            out[f"{name}.weight_quant.scale"] = params.take(groups)
            out[f"{name}.weight_quant.zero_point"] = params.take(groups) if r["zp"] else torch.zeros(groups)
        if r["bias"]:
            out[f"{name}.bias"] = params.take(_out_channels(r))
        if r["a"] and r["a_multibit"]:
            out[f"{name}.input_quant.alphas"] = params.take(r["a_bits"]).view(1, -1)
        elif r["a"]:
            out[f"{name}.input_quant.scale"] = params.take(1)
            out[f"{name}.input_quant.zero_point"] = params.take(1)
    params.check_done()
    for blob in blobs.values():
        blob.check_done()
    claimed = sorted(owned & set(tensors))
    if claimed:
        raise LowbitError(f"tensor {claimed[0]!r} stands beside the layer rows that hold its layer's values")
    _check_tensors(rows, out, cfg)
    sparse = _check_sparse(stored.get(SPARSE_KEY), rows, tensors)
    out.update(tensors)
    manifest = {**header, "fold_pairs": pairs, "layer_order": [r["name"] for r in rows if r["role"] != "unused"],
                "layers": {r["name"]: _spec(r, cfg) for r in rows}}
    if group_bits:
        manifest["group_bits"] = group_bits
    derived = [_row_spec(r, cfg, out, group_bits, sparse) for r in rows]
    if version in SPEC_VERSIONS:
        manifest[SPECS_KEY] = _stored_specs(stored, derived)
    else:
        manifest[SPECS_KEY] = {spec.name: spec for spec in derived}
    if layer_bits is not None:
        manifest["layer_bits"] = layer_bits_record({r["name"]: b for r, b in zip(rows, layer_bits)})
    if sparse:
        manifest[SPARSE_KEY] = sparse
    return manifest, out


def _storage_codes(row: dict, cfg: QuantConfig, widths: list[int], runs: dict[int, Tensor]) -> Tensor:
    """A version-5 weight's codes, packed at each group's own width (``runs``), checked against each
    group's range and packed again at the row's w_bits, as version 4 stores them."""
    name, shape, groups = row["name"], row["shape"], row["groups"]
    axis = LAYER_KINDS[row["kind"]].axis
    signed, narrow = cfg.w_symmetric, cfg.w_narrow
    spec = TensorSpec("uniform", row["w_bits"], signed, signed, narrow, "channel", shape[axis], groups, axis,
                      tuple(widths), torch.ones(groups), torch.zeros(groups))  # the layout only: no values
    bottoms, binary = group_offsets(spec)
    u = unpack_rows(runs, widths, math.prod(shape) // groups)
    tops = torch.tensor([qspec.width_range(b, signed, narrow)[1] for b in widths]).unsqueeze(1)
    q = torch.where(torch.tensor(binary).unsqueeze(1), 2 * u - 1, u + torch.tensor(bottoms).unsqueeze(1))
    if bool((q > tops).any()):  # e.g. 2^(b-1) in a narrow signed b-bit group
        g = int((q > tops).any(1).nonzero()[0, 0])
        raise LowbitError(f"layer {name!r}: weight codes outside their channel's range (group_bits): group {g} "
                          f"({widths[g]} bits) holds {int(q[g].max())}, above its top {int(tops[g, 0])}")
    q = qspec.ungroup_rows(spec, q, tuple(shape))
    qmin = _weight_qmin(row["w_bits"], signed, narrow)
    if signed and row["w_bits"] == 1:  # every group binary: stored as {-1, 0}, as a 1-bit layer is
        q = (q + 1) // 2 - 1
    return pack_codes(q, row["w_bits"], qmin)


def _row_spec(row: dict, cfg: QuantConfig, tensors: dict[str, Tensor], group_bits: dict[str, list[int]],
              sparse: list[str]) -> LayerSpec:
    """The ``LayerSpec`` a checked row, the config and the row's checked tensors describe (how files
    before version 3 hold it, and what a stored record must equal). Multibit weights are signed
    bases per output channel; their code book (and so the row's ``w_multibit``) says which they are."""
    name, kind = row["name"], LAYER_KINDS[row["kind"]]
    weight = inp = None
    widths = group_bits.get(name)
    try:
        if row["w"] and row["w_multibit"]:
            weight = TensorSpec("multibit", row["w_bits"], True, True, False, "channel", row["shape"][kind.axis],
                                row["groups"], kind.axis, tuple(widths) if widths else None,
                                alphas=tensors[f"{name}.weight_quant.alphas"])
        if row["a"] and row["a_multibit"]:
            inp = TensorSpec("multibit", row["a_bits"], bool(row["a_signed"]),
                             alphas=tensors[f"{name}.input_quant.alphas"])
    except LowbitError as exc:
        raise LowbitError(f"layer {name!r}: {exc}") from None
    if row["w"] and not row["w_multibit"]:
        channels = row["shape"][kind.axis]
        # a layer given per-channel widths by layer_bits has per-channel scales whatever the config says
        forced = widths and row["groups"] == channels != effective_groups(channels, cfg.granularity, cfg.groups)
        weight = TensorSpec("uniform", row["w_bits"], cfg.w_symmetric, cfg.w_symmetric, cfg.w_narrow,
                            "channel" if forced else cfg.granularity, channels, row["groups"], kind.axis,
                            tuple(widths) if widths else None,
                            tensors[f"{name}.weight_quant.scale"],
                            tensors.get(f"{name}.weight_quant.zero_point", torch.zeros(row["groups"])))
    if row["a"] and not row["a_multibit"]:
        is_sparse = name in sparse
        inp = TensorSpec("sparse" if is_sparse else "uniform", row["a_bits"], bool(row["a_signed"]),
                         not is_sparse and bool(row["a_signed"]), False, scale=tensors[f"{name}.input_quant.scale"],
                         zero_point=tensors[f"{name}.input_quant.zero_point"],
                         threshold=tensors[f"{name}.input_quant.threshold"] if is_sparse else None)
    return LayerSpec(name, row["kind"], row["role"], tuple(row["shape"]), row["out"], weight, inp)


def _stored_specs(stored: dict, derived: list[LayerSpec]) -> dict[str, LayerSpec]:
    """A version-3 or 4 manifest's layer specs (code book table and per-row references), each checked
    to equal its row's spec (``_row_spec``)."""
    books, refs = _code_book_refs(stored, len(derived))
    out = {}
    for row_refs, want in zip(refs, derived):
        parts = []
        for ref, spec, what in zip(row_refs, (want.weight, want.input), ("weight", "input")):
            if (ref is None) != (spec is None):
                raise LowbitError(f"layer {want.name!r}: {SPECS_KEY} gives its {what} "
                                  f"{'no' if ref is None else 'a'} code book, its row {'a' if ref is None else 'none'}")
            if spec is None:
                parts.append(None)
                continue
            meta = {**dict(zip(CODE_BOOK_FIELDS, books[ref])), "channels": spec.channels,
                    "num_groups": spec.num_groups, "axis": spec.axis,
                    "group_bits": None if spec.group_bits is None else list(spec.group_bits)}
            for flag in _CODE_BOOK_FLAGS:  # 0/1 in the file (and nothing else: True would pass as 1)
                value = meta[flag]
                meta[flag] = bool(value) if _is_int(value) and value in (0, 1) else value
            try:
                got = TensorSpec.from_record(meta, spec.to_record()[1])
            except LowbitError as exc:
                raise LowbitError(f"layer {want.name!r}: its {what} code book {ref}: {exc}") from None
            if got != spec:
                raise LowbitError(f"layer {want.name!r}: its {what} code book {ref} does not match its row and the "
                                  f"config ({_show(books[ref])})")
            parts.append(got)
        out[want.name] = dataclasses.replace(want, weight=parts[0], input=parts[1])
    return out


def _code_book_refs(stored: dict, count: int) -> tuple[list[list], list[list[int | None]]]:
    """The manifest's code book table and, for each of ``count`` rows, its weight's and its input's
    index into it (None: float), checked for structure (what the books hold is checked against the rows)."""
    books = _required(stored, CODE_BOOKS_KEY)
    if not isinstance(books, list) or not all(isinstance(b, list) and len(b) == len(CODE_BOOK_FIELDS) for b in books):
        raise _damaged(CODE_BOOKS_KEY, f"it must be a list of code books, each a list of {list(CODE_BOOK_FIELDS)}, "
                       f"got {_show(books)}")
    flat = _required(stored, SPECS_KEY)
    if not isinstance(flat, list) or len(flat) != 2 * count or not all(
            i is None or (_is_int(i) and 0 <= i < len(books)) for i in flat):
        raise _damaged(SPECS_KEY, f"it must hold two code book indices (or null) per row, weight then input, "
                       f"got {_show(flat)}")
    unused = set(range(len(books))) - set(flat)
    if unused:
        raise _damaged(CODE_BOOKS_KEY, f"code book {min(unused)} is used by no layer")
    return books, [flat[i:i + 2] for i in range(0, len(flat), 2)]


def _multibit_parts(stored: dict, count: int) -> list[tuple[bool, bool]]:
    """For each row of a version-4 manifest: whether its weight and its input have a multibit code book."""
    books, refs = _code_book_refs(stored, count)
    return [(w is not None and books[w][0] == "multibit", a is not None and books[a][0] == "multibit") for w, a in refs]


def _check_sparse(value: Any, rows: list[dict], tensors: dict[str, Tensor]) -> list[str]:
    """The manifest's sparse-input layers, each a quantized unsigned input with a valid threshold tensor."""
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value) or len(set(value)) != len(value):
        raise _bad(SPARSE_KEY, "a list of distinct layer names", value)
    by_name = {r["name"]: r for r in rows}
    for name in value:
        row = by_name.get(name)
        if row is None or not row["a"] or row["a_signed"] or row["a_multibit"]:
            raise LowbitError(f"{SPARSE_KEY}: {name!r} must name a layer with a quantized unsigned input")
        try:
            t = _tensor(tensors, f"{name}.input_quant.threshold", torch.float32, [1])
            _refuse_values(t, ~(torch.isfinite(t) & (t >= 0)), "input_quant.threshold", "finite and >= 0")
        except LowbitError as exc:
            raise LowbitError(f"layer {name!r}: {exc}") from None
    stray = sorted(k for k in tensors if k.endswith(".input_quant.threshold") and k[:-len(".input_quant.threshold")]
                   not in value)
    if stray:
        raise LowbitError(f"tensor {stray[0]!r} is a sparse-input threshold of a layer that {SPARSE_KEY} does not list")
    return value


def _v1_flag(value: Any, field: str) -> int:
    if not isinstance(value, bool):
        raise _bad(field, "true or false", value)
    return int(value)


def _from_v1(stored: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """A version-1 manifest (expanded per-layer entries, one tensor per field), checked like version 2."""
    cfg = _config(_required(stored, "config"))
    header = _check_header(stored)
    layers = _required(stored, "layers")
    if not isinstance(layers, dict) or not layers:
        raise _damaged("layers", f"it must be a non-empty object of layer entries, got {_show(layers)}")
    pairs = _pairs(_required(stored, "fold_pairs"), "fold_pairs")
    _check_pairs(pairs)
    rows = []
    for name, spec in layers.items():
        if not isinstance(spec, dict) or set(spec) != V1_SPEC_KEYS:
            raise LowbitError(f"layer {name!r}: a version-1 entry must have exactly the keys {sorted(V1_SPEC_KEYS)}, "
                              f"got {_show(spec)}")
        try:
            w, a, signed = (_v1_flag(spec[k], k) for k in ("w_enabled", "a_enabled", "a_signed"))
        except LowbitError as exc:
            raise LowbitError(f"layer {name!r}: {exc}") from None
        row = _check_row({"name": name, "role": spec["role"], "shape": spec["weight_shape"],
                          "groups": spec["num_groups"], "w_bits": spec["w_bits"], "w": w,
                          "zp": int(bool(w) and f"{name}.weight_quant.zero_point" in tensors),
                          "bias": int(f"{name}.bias" in tensors), "a_bits": spec["a_bits"], "a": a,
                          "a_signed": signed, "bn": None}, cfg, f"layer {name!r}")
        derived = _spec(row, cfg)
        derived["kind"] = next(k for k, v in LEGACY_KINDS.items() if v == derived["kind"])
        for key in sorted(V1_SPEC_KEYS):  # the derived keys must agree with the config and the row
            want = derived[key]
            if spec[key] != want or type(spec[key]) is not type(want):
                raise LowbitError(f"layer {name!r}: {key} must be {want!r} (from the config and the layer), "
                                  f"got {_show(spec[key])}")
        if w and f"{name}.weight" in tensors:
            raise LowbitError(f"layer {name!r}: the artifact holds both its weight codes and a float weight")
        rows.append(row)
    _check_tensors(rows, tensors, cfg)
    specs = {r["name"]: _row_spec(r, cfg, tensors, {}, []) for r in rows}
    return {**header, "fold_pairs": pairs, "layers": {r["name"]: _spec(r, cfg) for r in rows}, SPECS_KEY: specs}, tensors


def read_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """Manifest and tensors of an artifact, every value checked; LowbitError for anything that is not one.

    Whatever the file's version, the manifest comes back with one expanded row per layer under
    ``"layers"`` (kind, role, weight_shape, w_bits, w_qmin, num_groups, a_bits, ...), the layers'
    ``quant.spec.LayerSpec`` by name under ``"specs"`` (stored since version 3, derived from the rows
    and the config before), and ``"fold_pairs"``, and the tensors by name: ``<layer>.weight.codes`` (packed uint8),
    ``<layer>.weight_quant.scale`` / ``.zero_point``, ``<layer>.bias``, ``<layer>.input_quant.*``; a
    multibit weight's ``<layer>.weight.planes`` (packed sign bits) and ``<layer>.weight_quant.alphas``
    (channels x bases, zero-padded), a multibit input's ``<layer>.input_quant.alphas``. A
    ``lowbit-multibit`` file comes back as the version-4 artifact of the same model.
    Only safetensors and JSON are parsed: nothing in the file is unpickled or run.
    """
    from safetensors import safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise LowbitError(f"an artifact path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"no artifact at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise LowbitError(f"{path} is not a lowbit artifact (not a readable safetensors file: {exc})") from None
    from . import legacy_multibit

    legacy = meta.get("format") == legacy_multibit.FORMAT
    if meta.get("format") != FORMAT and not legacy:
        raise LowbitError(f"{path} is not a lowbit artifact (format tag {_show(meta.get('format'))})")
    version = meta.get("version")
    readable = (legacy_multibit.VERSION,) if legacy else READABLE_VERSIONS
    if version not in readable:
        raise LowbitError(f"{path}: {'multi-bit ' if legacy else ''}artifact version {_show(version)} is not "
                          f"supported (need one of {readable})")
    try:
        try:
            manifest = json.loads(meta["manifest"])
        except (KeyError, ValueError, RecursionError):  # JSONDecodeError is a ValueError; deep nesting recurses
            raise LowbitError("the artifact's manifest is missing or damaged (not JSON)") from None
        if not isinstance(manifest, dict):
            raise LowbitError(f"the artifact's manifest is missing or damaged (a JSON object, got "
                              f"{_show(manifest)})")
        if legacy:  # a DMBQ model written before version 4: the same numbers, rearranged
            manifest, tensors = _expand(*legacy_multibit.as_version_4(manifest, tensors), "4")
        elif version == "1":
            manifest, tensors = _from_v1(manifest, tensors)
        else:
            manifest, tensors = _expand(manifest, tensors, version)
    except LowbitError as exc:
        raise LowbitError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:  # a check missed it
        raise LowbitError(f"{path}: the artifact's manifest is missing or damaged "
                          f"({type(exc).__name__}: {exc})") from None
    return manifest, tensors


def _unstored_quantizer_state(specs: dict[str, LayerSpec], key: str) -> bool:
    """Whether ``key`` is quantizer state the artifact does not store: the scale or zero point of a
    float weight or input (it plays no part), or any buffer of a multibit quantizer (built whole
    from its spec by ``graph.surgery.wrap_layer``)."""
    for quantizer in ("weight_quant", "input_quant"):
        layer_name, found, leaf = key.partition(f".{quantizer}.")
        spec = specs.get(layer_name) if found else None
        if spec is not None:
            part = spec.weight if quantizer == "weight_quant" else spec.input
            return (part is None and leaf in ("scale", "zero_point")) or (part is not None and part.kind == "multibit")
    return False


def _plane_codes(spec: TensorSpec, packed: Tensor, shape: torch.Size) -> Tensor:
    """A multibit weight's level indices (int64, ``shape``) from its packed sign planes (``PLANES_KEY``)."""
    n = math.prod(shape) // spec.num_groups
    signs = unpack_codes(packed, 1, 0, sum(spec.widths) * n).to(torch.int64)
    index = torch.zeros(spec.num_groups, n, dtype=torch.int64)
    pos = 0
    for c, b in enumerate(spec.widths):  # bit i of a level index is the state of base i
        index[c] = (signs[pos:pos + b * n].view(b, n) << torch.arange(b).unsqueeze(1)).sum(0)
        pos += b * n
    return qspec.ungroup_rows(spec, index, shape)


def _zoo_model(arch: dict | None) -> nn.Module:
    """The zoo architecture an artifact names, built only through the model registry."""
    if not arch:
        raise LowbitError("this artifact does not name a zoo architecture: pass model= (the FP model)")
    from ..models import create_model

    kwargs = arch.get("kwargs", {})
    try:
        return create_model(arch["name"], **kwargs)
    except LowbitError as exc:  # an unknown name, or arguments its constructor refuses
        raise LowbitError(f"arch: {exc}") from None
    except Exception as exc:  # a file must never crash the loader, whatever it names
        raise LowbitError(f"arch: zoo model {arch['name']!r} cannot be built ({type(exc).__name__}: {exc})") from None


def _check_state(tensors: dict[str, Tensor], target: dict[str, Tensor]) -> None:
    """Every stored tensor names a tensor of the model, with its shape (and its dtype, floats stored as float32)."""
    for key, value in tensors.items():
        want = target.get(key)
        if want is None:
            raise LowbitError(f"artifact does not fit the model: tensor {key!r} is not one of the model's")
        dtype = torch.float32 if want.is_floating_point() else want.dtype
        if value.dtype != dtype or value.shape != want.shape:
            raise LowbitError(f"tensor {key!r} must be {dtype} of shape {list(want.shape)} (the model's), got "
                              f"{value.dtype} of shape {list(value.shape)}")


def _check_execution_order(qmodel: nn.Module, input_shape: list[int], expected: list[str]) -> None:
    """The model calls its layers in the order of the artifact's rows (catches swapped or renamed rows)."""
    param = next((p for p in qmodel.parameters() if p.is_floating_point()), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    try:
        order = execution_order(qmodel, x)
    except Exception as exc:  # the model's own forward refused an input of the recorded shape
        raise LowbitError(f"input_shape {input_shape} does not fit the model ({type(exc).__name__}: {exc})") from None
    if order != expected:
        i = next(i for i, (a, b) in enumerate(zip(order + [None], expected + [None])) if a != b)
        raise LowbitError(f"the layer rows are not in the order the model calls its layers (swapped or renamed "
                          f"rows?): call {i + 1} is {(order + [None])[i]!r}, the artifact's row says "
                          f"{(expected + [None])[i]!r}")


@torch.no_grad()
def load_artifact(path: str | os.PathLike, model: nn.Module | None = None, device: str = "cpu") -> nn.Module:
    """Rebuild the quantized model stored at ``path``; ``model`` supplies only the architecture.

    Beyond read_artifact's checks, the file must fit the model: layer names, shapes and scale
    groups, fold pairs (a conv-like layer and a BatchNorm of its width), every other tensor's
    dtype and shape, codes inside their range, and (with a recorded input shape) the order in
    which the model calls its layers. Anything else is a LowbitError naming the file.
    """
    manifest, tensors = read_artifact(path)
    try:
        return _rebuild(manifest, tensors, model, device)
    except LowbitError as exc:
        raise LowbitError(f"{path}: {exc}") from None


def _rebuild(manifest: dict, tensors: dict[str, Tensor], model: nn.Module | None, device: str) -> nn.Module:
    if model is None:
        model = _zoo_model(manifest.get("arch"))
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
    layers = dict(float_layers(qmodel))
    if set(layers) != set(manifest["layers"]):
        not_layers = sorted(set(manifest["layers"]) - set(layers))
        raise LowbitError("the model's layers do not match the artifact's (different architecture?): " + (
            f"{not_layers[:3]} are not layers the model has lowbit quantize" if not_layers else
            f"the model's {sorted(set(layers) - set(manifest['layers']))[:3]} have no row"))
    specs: dict[str, LayerSpec] = manifest[SPECS_KEY]
    state = {}
    for name, spec in manifest["layers"].items():
        layer, lspec = layers[name], specs[name]
        kind, ws = layer_kind(layer), lspec.weight
        groups = effective_groups(layer.weight.shape[kind.axis], cfg.granularity, cfg.groups)
        if ws is not None and (ws.kind == "multibit" or ws.granularity == "channel"):
            # multibit alphas, and per-channel widths from layer_bits, are per output channel whatever the config says
            groups = layer.weight.shape[kind.axis]
        if list(layer.weight.shape) != spec["weight_shape"] or groups != spec["num_groups"]:
            raise LowbitError(f"layer {name!r}: shape or groups differ from the artifact's (weight "
                              f"{list(layer.weight.shape)} in {groups} groups in the model, "
                              f"{spec['weight_shape']} in {spec['num_groups']} in the artifact)")
        if spec["kind"] != kind.name:
            raise LowbitError(f"layer {name!r}: the artifact holds a {spec['kind']} layer, the model a {kind.name}")
        if layer.bias is None and f"{name}.bias" in tensors:  # e.g. added by bias correction
            layer.bias = nn.Parameter(torch.zeros(out_channels(layer), device=layer.weight.device))
        # the quantized layer, its quantizers built from the stored spec (checked against the layer)
        layer = wrap_layer(qmodel, name, layer, lspec, cfg)
        for key in ("weight_quant.alphas", "input_quant.alphas"):  # in the spec already
            tensors.pop(f"{name}.{key}", None)
        if ws is not None and ws.kind == "multibit":
            codes = _plane_codes(ws, tensors.pop(f"{name}.weight.planes"), layer.weight.shape)
            state[f"{name}.weight"] = qspec.dequantize(ws, codes).to(layer.weight.device)
        elif ws is not None:
            qmin, qmax = (-1, 1) if ws.binary else qspec.qrange(ws)
            codes = unpack_codes(tensors.pop(f"{name}.weight.codes"), ws.bits, qmin, layer.weight.numel())
            if not ws.binary and codes.numel() and codes.max() > qmax:  # e.g. 2^b - 1 in a narrow signed range
                raise LowbitError(f"layer {name!r}: weight codes above the {ws.bits}-bit range's top {qmax}")
            codes = codes.view_as(layer.weight)
            if ws.group_bits is not None:
                lo, hi = (qspec.channel_view(ws, t, layer.weight.dim()) for t in qspec.group_ranges(ws))
                if ((codes < lo) | (codes > hi)).any():
                    raise LowbitError(f"layer {name!r}: weight codes outside their channel's range (group_bits)")
            if ws.binary:
                codes = 2 * (codes + 1) - 1
            # unpacked, checked and dequantized on the CPU, as the spec's parameters are
            state[f"{name}.weight"] = qspec.dequantize(ws, codes).to(layer.weight.device)
    target = qmodel.state_dict()
    _check_state(tensors, target)
    state.update(tensors)
    # the model's own per-module metadata (versions): some modules' _load_from_state_dict read it
    # (torchvision's MNASNet refuses a state dict without it)
    state = OrderedDict(state)
    state._metadata = getattr(target, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _unstored_quantizer_state(specs, k)]
    if missing or unexpected:
        raise LowbitError(f"artifact does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # the resolved widths: stored ones, else those the rows hold (older files followed the config's protocol)
    resolved = from_record(manifest["layer_bits"]) if manifest.get("layer_bits") else {
        n: LayerBits(s["w_bits"] if s["w_enabled"] else None, s["a_bits"] if s["a_enabled"] and s["w_enabled"] else None)
        for n, s in manifest["layers"].items()}
    attach(qmodel, QuantRecord(cfg, layer_order=list(manifest.get("layer_order") or []), layer_bits=resolved,
                               fold_pairs=[tuple(p) for p in manifest.get("fold_pairs") or []],
                               arch=manifest.get("arch"), method=manifest.get("method"),
                               options=manifest.get("options") or {}, input_shape=manifest.get("input_shape")))
    publish(qmodel)
    if manifest.get("layer_order") and manifest.get("input_shape"):
        _check_execution_order(qmodel, manifest["input_shape"], manifest["layer_order"])
    return qmodel.eval()
