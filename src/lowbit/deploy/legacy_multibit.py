"""Reading ``lowbit-multibit`` files: DMBQ models written before the artifact's version 4.

That format (version 1) held the same numbers as a version-4 artifact in another arrangement:
per-row JSON objects instead of the compact rows, its own code book fields, the params of a row
in the order weight, input, bias (version 4: weight, bias, input), zero points always stored. The
sign planes (``planes``) and the integer codes (``codes<b>``) are laid out as in version 4.
``as_version_4`` rearranges a file's manifest and tensors into a version-4 manifest, which
``deploy.artifact`` then checks and loads like any other: nothing here builds a model.

A file of this format holds no ConvTranspose output counts: such a layer's bias is read as
``shape[1]`` long (one conv group); a grouped one's file is refused by the params length check.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from ..errors import LowbitError
from ..layer_bits import from_record
from ..quant.layers import LAYER_KINDS
from ..quant.spec import effective_groups
from .artifact import CODE_BOOKS_KEY, FIELDS, PARAMS_KEY, PARAMS_LAYOUT, SPECS_KEY, compact_layer_bits
from .blob_reader import BlobReader

FORMAT = "lowbit-multibit"
VERSION = "1"
_HEADER = ("arch", "method", "config", "options", "input_shape", "fold_pairs")


def _object(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise LowbitError(f"{field} must be an object, got {str(value)[:60]!r}")
    return value


def _count(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LowbitError(f"{field} must be an integer >= 0, got {str(value)[:60]!r}")
    return value


def _book(book: list, books: dict[str, int]) -> int:
    return books.setdefault(json.dumps(book), len(books))


def as_version_4(stored: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """A version-1 ``lowbit-multibit`` manifest and its tensors as a version-4 artifact's (unchecked:
    ``deploy.artifact`` checks the result); a LowbitError naming the field where the file cannot be read."""
    layers, config = stored.get("layers"), _object(stored.get("config"), "config")
    if not isinstance(layers, list) or not layers:
        raise LowbitError("the multi-bit artifact's 'layers' must be a non-empty list of rows")
    legacy = BlobReader(tensors.pop(PARAMS_KEY, None), PARAMS_KEY, torch.float32)
    params: list[Tensor] = []
    rows, refs, group_bits = [], [], {}
    books: dict[str, int] = {}
    for i, raw in enumerate(layers):
        r = _object(raw, f"layers[{i}]")
        name, kind, shape = r.get("name"), r.get("kind"), r.get("shape")
        where = f"layer {name!r}"
        if kind not in LAYER_KINDS or not isinstance(shape, list) or len(shape) != LAYER_KINDS[kind].spatial + 2:
            raise LowbitError(f"{where}: kind and shape must name a layer kind and its weight shape, got {kind!r}, "
                              f"{str(shape)[:60]}")
        axis = LAYER_KINDS[kind].axis
        out = shape[1] if LAYER_KINDS[kind].transposed else shape[0]
        w, a = r.get("w"), r.get("a")
        # a float weight's columns take the config's values, as version 4 writes them (they are not read)
        groups = effective_groups(shape[axis], config.get("granularity", "channel"), config.get("groups"))
        row = {"name": name, "role": r.get("role"), "shape": shape, "groups": groups, "w_bits": config.get("w_bits"),
               "w": 0, "zp": 0, "bias": int(bool(r.get("bias"))), "a_bits": config.get("a_bits"), "a": 0,
               "a_signed": 0, "bn": None, "kind": kind, "out": out}
        ref = [None, None]
        weight: list[Tensor] = []
        if w is not None:
            w = _object(w, f"{where}: w")
            row["w"] = 1
            if w.get("kind") == "dmbq":
                bits = w.get("channel_bits")
                if not isinstance(bits, list) or len(bits) != shape[axis]:
                    raise LowbitError(f"{where}: channel_bits must list the {shape[axis]} channels' bases")
                bits = [_count(b, f"{where}: channel_bits") for b in bits]
                row["w_bits"], row["groups"] = max(bits), shape[axis]
                group_bits[name] = bits
                weight.append(legacy.take(sum(bits)))
                ref[0] = _book(["multibit", max(bits), 1, 1, 0, "channel"], books)
            elif w.get("kind") == "uniform":
                row["w_bits"], row["groups"] = w.get("bits"), _count(w.get("groups"), f"{where}: w groups")
                scale, zero = legacy.take(row["groups"]), legacy.take(row["groups"])
                row["zp"] = int(not w.get("symmetric") or bool(zero.any()))  # stored as version 4 stores them
                weight += [scale, zero] if row["zp"] else [scale]
                ref[0] = _book(["uniform", row["w_bits"], int(bool(w.get("symmetric"))), int(bool(w.get("symmetric"))),
                                int(bool(w.get("narrow"))), w.get("granularity")], books)
            else:
                raise LowbitError(f"{where}: unknown weight kind {str(w.get('kind'))[:60]!r}")
        inp: list[Tensor] = []
        if a is not None:
            a = _object(a, f"{where}: a")
            if a.get("kind") not in ("dmbq", "uniform"):
                raise LowbitError(f"{where}: unknown input kind {str(a.get('kind'))[:60]!r}")
            bits, signed = a.get("bits"), int(bool(a.get("signed")))
            row.update(a=1, a_bits=bits, a_signed=signed)
            if a["kind"] == "dmbq":  # its alphas
                inp.append(legacy.take(_count(bits, f"{where}: a bits")))
                ref[1] = _book(["multibit", bits, signed, 1, 0, "tensor"], books)
            else:  # scale and zero point
                inp.append(legacy.take(2))
                ref[1] = _book(["uniform", bits, signed, signed, 0, "tensor"], books)
        bias = [legacy.take(out)] if row["bias"] else []
        params += weight + bias + inp
        rows.append([row[f] for f in FIELDS])
        refs += ref
    legacy.check_done()
    manifest = {k: stored.get(k) for k in _HEADER}
    manifest.update(params=PARAMS_LAYOUT, fields=list(FIELDS), layers=rows, fold_pairs=stored.get("fold_pairs") or [])
    manifest[CODE_BOOKS_KEY] = [json.loads(b) for b in books]
    manifest[SPECS_KEY] = refs
    if group_bits:
        manifest["group_bits"] = group_bits
    if stored.get("layer_bits"):
        resolved = from_record(stored["layer_bits"], "the multi-bit artifact's layer_bits")
        missing = [row[0] for row in rows if row[0] not in resolved]
        if missing:
            raise LowbitError(f"the multi-bit artifact's layer_bits lack layer {str(missing[0])[:60]!r}")
        manifest["layer_bits"] = [compact_layer_bits(resolved[row[0]]) for row in rows]
    if params:
        tensors[PARAMS_KEY] = torch.cat(params)
    return manifest, tensors
