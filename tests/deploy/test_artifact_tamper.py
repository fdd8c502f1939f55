"""Tampered artifacts: every mutation of a real artifact loads with identical predictions or raises LowbitError.

A property test (hypothesis) mutates the manifest JSON (drops keys, swaps strings, puts edge values
anywhere: wrong types, NaN, inf, zero, negative, huge; alters rows), the tensors (bad scales, zero
points and biases, truncated or extended blobs, other dtypes and shapes, extra and missing keys) and
the metadata, rewrites the file with safetensors and loads it: the result must be a LowbitError or a
model whose predictions are bit-identical to the original's. Never another exception, never other
predictions.

One mutation per example. Validation cannot see a change to another *valid* value that the file
holds only once, so the strategies do not generate those: flipping the config's ``w_narrow`` or
``w_symmetric`` to the other bool (codes are read with another offset), or putting another finite
number in a bias, a positive finite scale, an in-range zero point, or a stored BN tensor. Catching
those would need a signature, not a check. Loads pass ``model=`` (an arch's kwargs are resolved by
the zoo constructor; ``test_artifact_validation`` covers them without building huge models).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import lowbit
from lowbit import LowbitError
from lowbit.deploy.artifact import PARAMS_KEY, is_reserved
from tests.conftest import calib_tensor, make_model

# The artifacts mutated: symmetric weights with BN folded (narrow signed codes, no weight zero
# points), asymmetric weights with BN kept (weight zero points, BN tensors stored by name), and
# asymmetric weights with per-channel widths (1 to 8 bits and pruned channels: codes at each
# channel's own width, zero points of the unpruned channels only).
CHANNEL_BITS = {"layers.0.0.conv1": [4, 2, 0, 1], "layers.1.0.conv1": [3, 3, 2, 8, 1, 1, 0, 4]}
CONFIGS = {
    "sym": {"w_bits": 4, "a_bits": 4},
    "asym": {"w_bits": 4, "a_bits": 4, "w_symmetric": False, "fold_bn": False},
    "chan": {"w_bits": 4, "a_bits": 4, "w_symmetric": False, "layer_bits": CHANNEL_BITS},
}

# Values put in place of any manifest value: wrong types, NaN/inf, zero, negative, huge, real names.
EDGE_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 17, 99, 2 ** 31, 2 ** 63, 10 ** 30, -(10 ** 30),
    0.5, 1.0, 4.0, -0.0, math.nan, math.inf, -math.inf, 1e300,
    "", "x", "4", "body", "unused", "conv1", "layers.0.bn1", "layers.0.conv1", [], [1], [1, 2], {}, {"a": 1},
]
# Bad values for tensors: every one is invalid where it is put.
# (the float32 maximum overflows once multiplied by the code range: a scale must leave that finite)
BAD_SCALES = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e-30, torch.finfo(torch.float32).max]
BAD_ZERO_POINTS = [math.nan, math.inf, -1.0, 0.5, 256.0, 1e9]  # not integers, or outside [0, 2^b - 1]
BAD_BIASES = [math.nan, math.inf, -math.inf]  # any finite bias is a valid (different) model
NEW_TENSOR_NAMES = ["foo", "codes3", "codes2", "codes16", "params2", "conv1.weight", "fc.bias", "fc.weight",
                    "conv1.weight_quant.scale", "fc.input_quant.zero_point", "layers.0.bn1.running_mean",
                    "conv1.weight.codes"]


@dataclass
class Artifact:
    """One exported artifact, read back raw: metadata, manifest and tensors, plus reference predictions."""

    name: str
    model: torch.nn.Module
    meta: dict[str, str]
    manifest: dict
    tensors: dict[str, torch.Tensor]
    images: torch.Tensor
    expected: torch.Tensor
    scratch: Path

    def params_positions(self) -> dict[str, list[tuple[int, int]]]:
        """Positions in the params blob of each kind of value, with the code width that bounds zero points."""
        out: dict[str, list[tuple[int, int]]] = {"scale": [], "zero_point": [], "bias": []}
        layout = params_layout(self.manifest)
        assert max(start + count for start, count, _ in layout.values()) == self.tensors[PARAMS_KEY].numel()
        for (_, kind), (start, count, bits) in layout.items():
            group = {"weight_quant.scale": "scale", "input_quant.scale": "scale",
                     "bias": "bias"}.get(kind, "zero_point")
            out[group] += [(start + i, bits) for i in range(count)]
        return out


def params_layout(manifest: dict) -> dict[tuple[str, str], tuple[int, int, int]]:
    """``(layer, field) -> (start, count, bits)`` in a version-2 params blob, from the format's documented
    layout: weight scale[groups] if w, weight zero point[groups] if zp (version 5 with group_bits: of
    the unpruned groups), bias[shape[0]] if bias, input scale and zero point if a (``bits``: the code
    width bounding a zero point)."""
    out, pos = {}, 0
    group_bits = manifest.get("group_bits", {})
    for row in manifest["layers"]:
        r = dict(zip(manifest["fields"], row))
        entries = []
        if r["w"]:
            entries.append(("weight_quant.scale", r["groups"], r["w_bits"]))
            if r["zp"]:
                unpruned = sum(str(b) != "0" for b in group_bits[r["name"]]) if r["name"] in group_bits else r["groups"]
                entries.append(("weight_quant.zero_point", unpruned, r["w_bits"]))
        if r["bias"]:
            entries.append(("bias", r["shape"][0], 0))
        if r["a"]:
            entries += [("input_quant.scale", 1, r["a_bits"]), ("input_quant.zero_point", 1, r["a_bits"])]
        for field, count, bits in entries:
            out[(r["name"], field)] = (pos, count, bits)
            pos += count
    return out


def read_raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Artifact]:
    """The artifacts of a tiny ResNet-20, built once for the whole module."""
    out = {}
    images = calib_tensor(8, seed=123)
    for name, options in CONFIGS.items():
        model = make_model("resnet20")
        q = lowbit.quantize(model, calib_tensor(16), **options)
        scratch = tmp_path_factory.mktemp(f"tamper-{name}")
        meta, tensors = read_raw(lowbit.export(q, scratch / "original.lowbit"))
        with torch.no_grad():
            expected = q(images)
        out[name] = Artifact(name, model, meta, json.loads(meta["manifest"]), tensors, images, expected, scratch)
    return out


# ---------------------------------------------------------------- mutations

def json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indices) to a value inside a JSON document, the root excluded."""
    paths = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        paths.append(prefix + (key,))
        paths += json_paths(child, prefix + (key,))
    return paths


def get_path(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def set_path(doc: Any, path: tuple, value: Any) -> None:
    get_path(doc, path[:-1])[path[-1]] = value


def is_undetectable_flip(path: tuple, old: Any, new: Any) -> bool:
    """Flipping how codes are read (signed narrow range, symmetric weights) to the other valid bool.

    The file holds these once, in the config: a flipped ``w_narrow`` reads every code one step
    off, and asymmetric codes with small zero points read as symmetric ones stay in range.
    """
    return (path in (("config", "w_narrow"), ("config", "w_symmetric")) and isinstance(new, bool)
            and isinstance(old, bool))


def mutate_manifest(data: st.DataObject, art: Artifact, manifest: dict) -> str:
    kind = data.draw(st.sampled_from(["drop", "replace", "swap_strings", "rows"]), label="manifest mutation")
    if kind == "drop":
        path = data.draw(st.sampled_from(json_paths(manifest)), label="path")
        del get_path(manifest, path[:-1])[path[-1]]
        return f"drop {path}"
    if kind == "replace":
        path = data.draw(st.sampled_from(json_paths(manifest)), label="path")
        value = copy.deepcopy(data.draw(st.sampled_from(EDGE_VALUES), label="value"))
        old = get_path(manifest, path)
        if is_undetectable_flip(path, old, value) or (type(old) is type(value) and old == value):
            value = [value]  # (a list is never valid where a bool or an equal value was)
        set_path(manifest, path, value)
        return f"replace {path}: {old!r} -> {value!r}"
    if kind == "swap_strings":  # two different strings anywhere (names, roles, field names, config values)
        strings = [p for p in json_paths(manifest) if isinstance(get_path(manifest, p), str)]
        a = data.draw(st.sampled_from(strings), label="first string")
        va = get_path(manifest, a)
        b = data.draw(st.sampled_from([p for p in strings if get_path(manifest, p) != va]), label="second string")
        vb = get_path(manifest, b)
        set_path(manifest, a, vb)
        set_path(manifest, b, va)
        return f"swap {a}={va!r} with {b}={vb!r}"
    rows = manifest["layers"]
    i = data.draw(st.integers(0, len(rows) - 1), label="row")
    others = [j for j in range(len(rows)) if j != i]
    how = data.draw(st.sampled_from(["swap", "duplicate", "drop", "reverse", "move", "cell"]), label="row change")
    if how == "swap":
        j = data.draw(st.sampled_from(others), label="other row")
        rows[i], rows[j] = rows[j], rows[i]
    elif how == "duplicate":
        rows.insert(data.draw(st.integers(0, len(rows)), label="at"), copy.deepcopy(rows[i]))
    elif how == "drop":
        del rows[i]
    elif how == "reverse":
        rows.reverse()
    elif how == "move":
        rows.insert(data.draw(st.sampled_from(others), label="to"), rows.pop(i))
    else:  # one cell of row i takes another row's value of that column
        col = data.draw(st.integers(0, len(rows[i]) - 1), label="column")
        differ = [j for j in others if rows[j][col] != rows[i][col]]
        if not differ:
            rows.reverse()
            return "rows: reverse"
        j = data.draw(st.sampled_from(differ), label="other row")
        rows[i][col] = copy.deepcopy(rows[j][col])
        return f"rows: cell {i},{col} = {rows[j][col]!r} (from row {j})"
    return f"rows: {how} {i}"


def _blob_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in tensors if is_reserved(k))


def mutate_tensors(data: st.DataObject, art: Artifact, tensors: dict[str, torch.Tensor]) -> str:
    kinds = ["scale", "zero_point", "bias", "length", "dtype", "shape", "drop", "add"]
    if art.name == "sym":
        kinds.append("codes_all_ones")  # out of the narrow signed range: detectable only there
    extras = sorted(k for k in tensors if not is_reserved(k))
    if extras:
        kinds.append("extra")
    kind = data.draw(st.sampled_from(kinds), label="tensor mutation")
    if kind in ("scale", "zero_point", "bias"):
        positions = art.params_positions()[kind]
        pos, _ = data.draw(st.sampled_from(positions), label="position")
        value = data.draw(st.sampled_from({"scale": BAD_SCALES, "zero_point": BAD_ZERO_POINTS,
                                           "bias": BAD_BIASES}[kind]), label="value")
        params = tensors[PARAMS_KEY].clone()
        params[pos] = value
        tensors[PARAMS_KEY] = params
        return f"params[{pos}] ({kind}) = {value!r}"
    if kind == "codes_all_ones":
        key = data.draw(st.sampled_from([k for k in _blob_keys(tensors) if k != PARAMS_KEY]), label="blob")
        blob = tensors[key].clone()
        pos = data.draw(st.integers(0, blob.numel() - 1), label="byte")
        blob[pos] = 255
        tensors[key] = blob
        return f"{key}[{pos}] = 0xFF"
    if kind in ("length", "dtype", "shape"):
        key = data.draw(st.sampled_from(_blob_keys(tensors)), label="blob")
        blob = tensors[key]
        if kind == "length":
            k = data.draw(st.integers(-3, 3).filter(bool), label="change")
            tensors[key] = blob[:k].clone() if k < 0 else torch.cat([blob, torch.zeros(k, dtype=blob.dtype)])
            return f"{key}: length {k:+d}"
        if kind == "dtype":
            dtype = data.draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32,
                                               torch.int8, torch.int16, torch.uint8, torch.float32]), label="dtype")
            if dtype == blob.dtype:
                dtype = torch.int64
            tensors[key] = blob.to(dtype)
            return f"{key}: dtype {dtype}"
        tensors[key] = blob.reshape(1, -1) if data.draw(st.booleans(), label="row") else blob.reshape(-1, 1)
        return f"{key}: shape {tuple(tensors[key].shape)}"
    if kind == "drop":
        key = data.draw(st.sampled_from(sorted(tensors)), label="key")
        del tensors[key]
        return f"drop tensor {key}"
    if kind == "add":
        # only new names: putting another valid value under an existing BN name is a different, valid model
        name = data.draw(st.sampled_from([n for n in NEW_TENSOR_NAMES if n not in tensors]), label="name")
        shape = data.draw(st.sampled_from([(4,), (1,), (4, 1, 3, 3), (10, 64), (10,), (0,)]), label="shape")
        dtype = data.draw(st.sampled_from([torch.float32, torch.uint8, torch.int64]), label="dtype")
        tensors[name] = torch.ones(shape, dtype=dtype)
        return f"add tensor {name} {shape} {dtype}"
    key = data.draw(st.sampled_from(extras), label="extra tensor")
    value = tensors[key]
    change = data.draw(st.sampled_from(["float64", "float16", "int64", "float32", "shorter", "longer", "2d"]),
                       label="change")
    if change in ("float64", "float16", "int64", "float32"):
        dtype = getattr(torch, change)
        tensors[key] = value.to(dtype if dtype != value.dtype else torch.int32)
    elif change == "shorter":
        tensors[key] = value.reshape(-1)[:-1].clone() if value.numel() else torch.zeros(1, dtype=value.dtype)
    elif change == "longer":
        tensors[key] = torch.cat([value.reshape(-1), value.reshape(-1)[:1] * 0 + 1])
    else:
        tensors[key] = value.reshape(1, -1)
    return f"extra {key}: {change}"


def mutate_meta(data: st.DataObject, meta: dict[str, str]) -> str:
    key = data.draw(st.sampled_from(["format", "version", "manifest"]), label="metadata key")
    value = data.draw(st.sampled_from([None, "", "1", "3", "2.0", "lowbit", "x", "null", "[]", "{}", "NaN",
                                       "[" * 100_000 + "]" * 100_000, meta["manifest"][:-1],
                                       meta["manifest"] + "x"]), label="value")
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    return f"metadata {key} = {value[:40] if value else value!r}"


def mutated(data: st.DataObject, art: Artifact) -> tuple[Path, str]:
    """Write one mutation of ``art`` to its scratch folder; returns the path and what was changed."""
    meta, tensors, manifest = dict(art.meta), dict(art.tensors), copy.deepcopy(art.manifest)
    where = data.draw(st.sampled_from(["manifest", "manifest", "tensors", "tensors", "meta"]), label="target")
    if where == "manifest":
        what = mutate_manifest(data, art, manifest)
        meta["manifest"] = json.dumps(manifest, separators=(",", ":"))
    elif where == "tensors":
        what = mutate_tensors(data, art, tensors)
    else:
        what = mutate_meta(data, meta)
    path = art.scratch / "mutated.lowbit"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path, what


def outcome(art: Artifact, path: Path) -> str:
    """``refused`` (LowbitError), ``same`` (identical predictions), ``WRONG`` or ``CRASH <type>: <message>``."""
    try:
        loaded = lowbit.load(path, model=art.model)
    except LowbitError:
        return "refused"
    except Exception as exc:  # noqa: BLE001  (what the property forbids)
        return f"CRASH {type(exc).__name__}: {str(exc)[:200]}"
    try:
        with torch.no_grad():
            got = loaded(art.images)
    except Exception as exc:  # noqa: BLE001
        return f"CRASH at inference {type(exc).__name__}: {str(exc)[:200]}"
    return "same" if torch.equal(got, art.expected) else "WRONG"


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_every_mutation_loads_identically_or_is_refused(artifacts, data) -> None:
    art = artifacts[data.draw(st.sampled_from(sorted(artifacts)), label="artifact")]
    path, what = mutated(data, art)
    result = outcome(art, path)
    assert result in ("refused", "same"), f"{art.name}: {what}: {result}"
