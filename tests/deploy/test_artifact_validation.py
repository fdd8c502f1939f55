"""Every manifest value and tensor of an artifact is checked at load: one targeted case per check.

Each case damages one value of a real artifact and expects a LowbitError that starts with the file
and names the field; valid variants (unused layers, version 1, re-exports) still load.
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit import LowbitError
from lowbit.deploy import read_artifact
from lowbit.deploy.artifact import FIELDS, FORMAT, PARAMS_KEY
from tests.conftest import calib_tensor, make_model
from tests.deploy.test_artifact_tamper import params_layout, read_raw

BODY = "layers.0.0.conv1"  # a 4-bit body conv of the tiny ResNet-20 (4 output channels)
# per-channel widths (version 5: each channel's codes at its own width, none for the pruned one)
CHANNEL_BITS = {BODY: [4, 2, 0, 1], "layers.1.0.conv1": [3, 3, 2, 8, 1, 1, 0, 4]}


class Source:
    """A good artifact, its raw parts, its model and its predictions."""

    def __init__(self, root: Path, name: str, **options: Any) -> None:
        self.model = make_model("resnet20")
        self.q = lowbit.quantize(self.model, calib_tensor(16), w_bits=4, a_bits=4, **options)
        self.path = lowbit.export(self.q, root / f"{name}.lowbit")
        self.meta, self.tensors = read_raw(self.path)
        self.manifest = json.loads(self.meta["manifest"])
        self.images = calib_tensor(4, seed=9)
        with torch.no_grad():
            self.expected = self.q(self.images)

    def write(self, out: Path, manifest: Callable | None = None, tensors: Callable | None = None,
              meta: Callable | None = None) -> Path:
        """A copy with ``manifest(m)`` / ``tensors(t)`` / ``meta(d)`` applied in place (each may be None)."""
        m, t, d = copy.deepcopy(self.manifest), dict(self.tensors), dict(self.meta)
        if manifest:
            manifest(m)
        if tensors:
            tensors(t)
        d["manifest"] = json.dumps(m)
        if meta:
            meta(d)
        save_file({k: v.contiguous() for k, v in t.items()}, str(out), metadata=d)
        return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Source]:
    root = tmp_path_factory.mktemp("validation")
    return {"sym": Source(root, "sym"),  # symmetric weights, BN folded
            "asym": Source(root, "asym", w_symmetric=False, fold_bn=False),  # zero points, BN tensors by name
            "chan": Source(root, "chan", layer_bits=CHANNEL_BITS),  # per-channel widths, narrow signed codes
            "chanasym": Source(root, "chanasym", w_symmetric=False, layer_bits=CHANNEL_BITS)}


def cell(name: str, field: str, value: Any) -> Callable[[dict], None]:
    """Manifest change: the row of layer ``name`` gets ``value`` in column ``field``."""
    def change(m: dict) -> None:
        row = next(r for r in m["layers"] if r[0] == name)
        row[m["fields"].index(field)] = value
    return change


def key(path: tuple, value: Any = ..., drop: bool = False) -> Callable[[dict], None]:
    """Manifest change: the value at ``path`` set to ``value`` (or dropped)."""
    def change(m: dict) -> None:
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        if drop:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return change


def swap_rows(a: str, b: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        i = next(i for i, r in enumerate(m["layers"]) if r[0] == a)
        j = next(i for i, r in enumerate(m["layers"]) if r[0] == b)
        m["layers"][i], m["layers"][j] = m["layers"][j], m["layers"][i]
    return change


MANIFEST_CASES: list[tuple[str, str, Callable[[dict], None], str]] = [
    # (id, artifact, change, message expected after "<file>: ")
    ("fields-missing", "sym", key(("fields",), list(FIELDS[:-1])), "'fields' is missing or damaged"),
    ("fields-duplicate", "sym", key(("fields",), list(FIELDS[:-1]) + ["name"]), "'fields' is missing or damaged"),
    ("fields-unknown", "sym", key(("fields",), list(FIELDS[:-1]) + ["colour"]), "'fields' is missing or damaged"),
    ("layers-absent", "sym", key(("layers",), drop=True), "'layers' is missing or damaged"),
    ("layers-empty", "sym", key(("layers",), []), "'layers' is missing or damaged"),
    ("row-length", "sym", key(("layers", 1), ["x"] * 13), rf"layers\[1\] must be a list of {len(FIELDS)} values"),
    ("name-int", "sym", key(("layers", 1, 0), 5), r"layers\[1\]: name must be a module name, got 5"),
    ("name-empty", "sym", key(("layers", 1, 0), ""), r"layers\[1\]: name must be a module name"),
    ("name-unknown", "sym", cell(BODY, "name", "nope"),
     r"layers do not match the artifact's \(missing e.g. \['nope'\]"),
    ("name-relu", "sym", cell("fc", "name", "relu"), r"\['relu'\] are not layers the model has lowbit quantize"),
    ("name-twice", "sym", cell(BODY, "name", "conv1"), "layer 'conv1' has more than one row"),
    ("role-unknown", "sym", cell(BODY, "role", "middle"), f"layer '{BODY}': role must be one of"),
    ("role-first-as-only", "sym", cell("conv1", "role", "only"), "layer 'conv1': role must be 'first'"),
    ("role-first-as-body", "sym", cell("conv1", "role", "body"), "layer 'conv1': role must be 'first'"),
    ("role-unused-active", "sym", cell(BODY, "role", "unused"), "role 'unused' has no active quantizer"),
    ("rows-swapped", "sym", swap_rows(BODY, "layers.0.0.conv2"), "not in the order the model calls its layers"),
    ("shape-zero", "sym", cell(BODY, "shape", [4, 0, 3, 3]), "shape must be a non-empty list of positive integers"),
    ("shape-float", "sym", cell(BODY, "shape", [4.0, 4, 3, 3]), "shape must be a non-empty list of positive"),
    ("shape-string", "sym", cell(BODY, "shape", "4x4x3x3"), "shape must be a non-empty list of positive"),
    ("shape-model", "sym", cell(BODY, "shape", [4, 4, 9, 1]), "shape or groups differ"),
    ("shape-kind", "sym", cell(BODY, "shape", [4, 4, 9]), "shape must be a 4-D weight shape for a conv2d layer"),
    ("groups-negative", "sym", cell(BODY, "groups", -1), f"layer '{BODY}': groups must be a positive integer, got -1"),
    ("groups-zero", "sym", cell(BODY, "groups", 0), "groups must be a positive integer, got 0"),
    ("groups-granularity", "sym", cell(BODY, "groups", 2), "groups must be 4, one per output channel"),
    ("w_bits-99", "sym", cell(BODY, "w_bits", 99), "w_bits must be an integer 1..16, got 99"),
    ("w_bits-0", "sym", cell(BODY, "w_bits", 0), "w_bits must be an integer 1..16, got 0"),
    ("w_bits-none", "sym", cell(BODY, "w_bits", None), "w_bits must be an integer 1..16, got None"),
    ("w_bits-string", "sym", cell(BODY, "w_bits", "4"), "w_bits must be an integer 1..16, got '4'"),
    ("w_bits-float", "sym", cell(BODY, "w_bits", 4.0), "w_bits must be an integer 1..16, got 4.0"),
    ("w_bits-bool", "sym", cell(BODY, "w_bits", True), "w_bits must be an integer 1..16, got True"),
    ("w_bits-protocol", "sym", cell(BODY, "w_bits", 3), "w_bits must be 4 for a 'body' layer"),
    ("w_bits-last", "sym", cell("fc", "w_bits", 4), "w_bits must be 8 for a 'last' layer"),
    ("a_bits-0", "sym", cell(BODY, "a_bits", 0), "a_bits must be an integer 1..16 or null, got 0"),
    ("a_bits-99", "sym", cell(BODY, "a_bits", 99), "a_bits must be an integer 1..16 or null, got 99"),
    ("a_bits-none", "sym", cell(BODY, "a_bits", None), "a_bits must be an integer 1..16 when the input is quantized"),
    ("a_bits-protocol", "sym", cell(BODY, "a_bits", 8), "a_bits must be 4 for a 'body' layer"),
    ("a_bits-nan", "sym", cell(BODY, "a_bits", math.nan), "a_bits must be an integer 1..16 or null, got nan"),
    ("flag-w-2", "sym", cell(BODY, "w", 2), "w must be 0 or 1, got 2"),
    ("flag-zp-negative", "sym", cell(BODY, "zp", -1), "zp must be 0 or 1, got -1"),
    ("flag-bias-bool", "sym", cell(BODY, "bias", True), "bias must be 0 or 1, got True"),
    ("flag-a-string", "sym", cell(BODY, "a", "1"), "a must be 0 or 1, got '1'"),
    ("flag-a_signed-none", "sym", cell(BODY, "a_signed", None), "a_signed must be 0 or 1, got None"),
    ("a_signed-flipped", "sym", cell(BODY, "a_signed", 1), "a_signed must be 0: signed input codes need a_symmetric"),
    ("zp-required", "asym", cell(BODY, "zp", 0), "zp must be 1: the config's weights are asymmetric"),
    ("zp-without-w", "asym", cell(BODY, "w", 0), "zp must be 0 when the weights are not quantized"),
    ("w-cleared", "sym", cell(BODY, "w", 0), "w must be 1 .weights quantized. as the artifact.s layer_bits say"),
    ("bn-relu", "sym", cell("conv1", "bn", "relu"),  # the case: the ReLU became Identity silently
     r"fold pair \['conv1', 'relu'\]: 'relu' is a ReLU, not a BatchNorm"),
    ("bn-conv", "asym", cell("conv1", "bn", BODY), f"'{BODY}' is a Conv2d, not a BatchNorm"),
    ("bn-channels", "asym", cell("conv1", "bn", "layers.1.0.bn1"), "the BatchNorm has 8 channels, the layer 4"),
    ("bn-unknown", "sym", cell("conv1", "bn", "nope"), r"missing e.g. \['nope'\]"),
    ("bn-twice", "sym", cell("conv1", "bn", "layers.0.0.bn1"), "'layers.0.0.bn1' appears in more than one"),
    ("bn-int", "sym", cell("conv1", "bn", 5), "bn must be a module name or null, got 5"),
    ("bn-new-pair", "asym", cell("conv1", "bn", "bn1"), r"tensor 'bn1\.\w+' is not one of the model's"),
    ("fold_pairs-type", "sym", key(("fold_pairs",), "conv1"), "fold_pairs must be a list of"),
    ("fold_pairs-relu", "asym", key(("fold_pairs",), [["fc", "relu"]]), "'relu' is a ReLU, not a BatchNorm"),
    ("fold_pairs-linear-target", "asym", key(("fold_pairs",), [["relu", "bn1"]]), "'relu' is a ReLU, not a conv"),
    ("config-list", "sym", key(("config",), []), "'config' is missing or damaged"),
    ("config-absent", "sym", key(("config",), drop=True), "'config' is missing or damaged"),
    ("config-required", "sym", key(("config", "w_narrow"), drop=True), r"lacks \['w_narrow'\]"),
    ("config-w_bits-string", "sym", key(("config", "w_bits"), "4"), "config: .*w_bits must be an integer.*, got '4'"),
    ("config-w_bits-99", "sym", key(("config", "w_bits"), 99), "config: .*w_bits"),
    ("config-bool-string", "sym", key(("config", "w_symmetric"), "False"), "config: .*w_symmetric must be"),
    ("config-bool-int", "sym", key(("config", "fold_bn"), 1), "config: .*fold_bn must be .*, got 1"),
    ("config-granularity", "sym", key(("config", "granularity"), "rows"), "config: .*granularity must be one of"),
    ("config-groups", "sym", key(("config", "groups"), -1.5), "config: .*groups must be"),
    ("config-calib_size", "sym", key(("config", "calib_size"), 0), "config: .*calib_size"),
    ("config-a_symmetric", "sym", key(("config", "a_symmetric"), True), None),  # no row is signed: same model
    ("config-granularity-tensor", "sym", key(("config", "granularity"), "tensor"), "groups must be 1 .per-tensor"),
    ("options-list", "sym", key(("options",), []), "options must be an object"),
    ("method-int", "sym", key(("method",), 5), "method must be a string, got 5"),
    ("params-doc", "sym", key(("params",), 5), "params must be a string"),
    ("arch-string", "sym", key(("arch",), "resnet20"), "arch must be null or"),
    ("arch-name-int", "sym", key(("arch", "name"), 5), "arch must be null or"),
    ("arch-kwargs-list", "sym", key(("arch", "kwargs"), [4]), "arch must be null or"),
    ("input_shape-zero", "sym", key(("input_shape",), [1, 0, 16]), "input_shape must be a non-empty list of positive"),
    ("input_shape-string", "sym", key(("input_shape",), "1x16x16"), "input_shape must be a non-empty list"),
    ("input_shape-huge", "sym", key(("input_shape",), [1, 2 ** 20, 2 ** 20]), "input_shape must be one network input"),
    ("input_shape-channels", "sym", key(("input_shape",), [3, 16, 16]),
     r"input_shape \[3, 16, 16\] does not fit the model"),
    ("input_shape-absent", "sym", key(("input_shape",), drop=True), None),  # a record only: same model
    ("method-other", "sym", key(("method",), "mse"), None),  # a record only: same model
    # version 5: the widths say where each channel's codes are: a changed width reads other runs
    ("group_bits-pruned-widened", "chan", key(("group_bits", BODY), "4221"), "codes2 blob is too short"),
    ("group_bits-narrowed", "chan", key(("group_bits", BODY), "4101"), "codes1 blob is too short"),
    ("group_bits-storage", "chan", key(("group_bits", BODY), "3201"),
     r"group_bits\['layers.0.0.conv1'\] must be a list of 4 integers from 0 to 4 .* stored at 4"),
    ("group_bits-absent", "chan", key(("group_bits",), drop=True),  # layer_bits point at them
     r"layer_bits\[1\] must be per-channel widths of a layer with uniform weights and group_bits"),
    ("layer_bits-ref-not-channels", "chan", key(("layer_bits", 2), [4, 4, 1]),  # a per-layer row: no group_bits
     r"layer_bits\[2\] must be per-channel widths of a layer with uniform weights and group_bits"),
    ("layer_bits-ref-true", "chan", key(("layer_bits", 1, 2), True), r"layer_bits\[1\] must be null"),
]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_manifest_values_are_checked(sources, tmp_path, case) -> None:
    name, which, change, message = case
    src = sources[which]
    path = src.write(tmp_path / "m.lowbit", manifest=change)
    if message is None:  # a value that does not change the model: it loads, with the same predictions
        with torch.no_grad():
            assert torch.equal(lowbit.load(path, model=src.model)(src.images), src.expected)
        return
    with pytest.raises(LowbitError) as info:
        lowbit.load(path, model=src.model)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


def test_message_names_the_file_the_layer_and_the_field(sources, tmp_path) -> None:
    path = sources["sym"].write(tmp_path / "m.lowbit", manifest=cell(BODY, "w_bits", 99))
    with pytest.raises(LowbitError) as info:
        lowbit.load(path, model=sources["sym"].model)
    assert str(info.value) == f"{path}: layer '{BODY}': w_bits must be an integer 1..16, got 99"


def _set_param(src: Source, layer: str, field: str, value: float, index: int = 0) -> Callable[[dict], None]:
    start, count, _ = params_layout(src.manifest)[(layer, field)]
    assert index < count

    def change(t: dict) -> None:
        blob = t[PARAMS_KEY].clone()
        blob[start + index] = value
        t[PARAMS_KEY] = blob
    return change


def _blob(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(t: dict) -> None:
        t[key] = fn(t[key])
    return change


def _drop(key: str) -> Callable[[dict], None]:
    return lambda t: t.pop(key)


def _add(key: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda t: t.__setitem__(key, value)


F32_MAX = torch.finfo(torch.float32).max
TENSOR_CASES: list[tuple[str, str, Any, str]] = [
    # (id, artifact, change (a callable, or (layer, field, value) in the params blob), message)
    ("w-scale-nan", "sym", (BODY, "weight_quant.scale", math.nan),
     f"layer '{BODY}': weight_quant.scale must be finite and > 0"),
    ("w-scale-zero", "sym", (BODY, "weight_quant.scale", 0.0), "weight_quant.scale must be finite and > 0.*got 0.0"),
    ("w-scale-negative", "sym", (BODY, "weight_quant.scale", -0.1), "weight_quant.scale must be finite and > 0"),
    ("w-scale-inf", "sym", (BODY, "weight_quant.scale", math.inf), "weight_quant.scale must be finite and > 0"),
    ("w-scale-overflow", "sym", (BODY, "weight_quant.scale", F32_MAX), "steps still finite in float32"),
    ("a-scale-zero", "sym", (BODY, "input_quant.scale", 0.0), "input_quant.scale must be finite and > 0"),
    ("a-scale-nan", "sym", (BODY, "input_quant.scale", math.nan), "input_quant.scale must be finite and > 0"),
    ("a-zp-fraction", "sym", (BODY, "input_quant.zero_point", 0.5),
     r"input_quant.zero_point must be integers in the code range \[0, 15\]"),
    ("a-zp-negative", "sym", (BODY, "input_quant.zero_point", -1.0), "input_quant.zero_point must be integers"),
    ("a-zp-range", "sym", (BODY, "input_quant.zero_point", 16.0), "input_quant.zero_point must be integers"),
    ("a-zp-nan", "sym", (BODY, "input_quant.zero_point", math.nan), "input_quant.zero_point must be integers"),
    ("w-zp-range", "asym", (BODY, "weight_quant.zero_point", 16.0),
     r"weight_quant.zero_point must be integers in the code range \[0, 15\]"),
    ("w-zp-fraction", "asym", (BODY, "weight_quant.zero_point", 2.5), "weight_quant.zero_point must be integers"),
    ("bias-nan", "sym", (BODY, "bias", math.nan), f"layer '{BODY}': bias must be finite, got nan"),
    ("bias-inf", "sym", ("fc", "bias", -math.inf), "layer 'fc': bias must be finite"),
    ("params-short", "sym", _blob(PARAMS_KEY, lambda b: b[:-1].clone()), "params blob is too short"),
    ("params-long", "sym", _blob(PARAMS_KEY, lambda b: torch.cat([b, b[:1]])), "params blob is longer"),
    ("params-float64", "sym", _blob(PARAMS_KEY, lambda b: b.double()),
     "params blob must be a 1-D torch.float32 tensor"),
    ("params-2d", "sym", _blob(PARAMS_KEY, lambda b: b.reshape(1, -1)), "params blob must be a 1-D"),
    ("params-missing", "sym", _drop(PARAMS_KEY), "params blob is too short"),
    ("codes-short", "sym", _blob("codes4", lambda b: b[:-1].clone()), "codes4 blob is too short"),
    ("codes-long", "sym", _blob("codes4", lambda b: torch.cat([b, b[:1]])), "codes4 blob is longer"),
    ("codes-int8", "sym", _blob("codes4", lambda b: b.to(torch.int8)), "codes4 blob must be a 1-D torch.uint8 tensor"),
    ("codes-float", "sym", _blob("codes8", lambda b: b.float()), "codes8 blob must be a 1-D torch.uint8"),
    ("codes-missing", "sym", _drop("codes8"), "no codes8 blob for its 8-bit layers"),
    ("codes-unused", "sym", _add("codes3", torch.zeros(4, dtype=torch.uint8)), "weight codes that no layer"),
    ("codes-out-of-narrow-range", "sym", _blob("codes4", lambda b: torch.full_like(b, 255)),
     "weight codes above the 4-bit range's top 7"),
    ("extra-unknown", "sym", _add("foo", torch.zeros(3)), "tensor 'foo' is not one of the model's"),
    ("extra-float-weight", "sym", _add(f"{BODY}.weight", torch.zeros(4, 4, 3, 3)), f"'{BODY}.weight' stands beside"),
    ("extra-scale", "sym", _add(f"{BODY}.weight_quant.scale", torch.ones(4)), "stands beside the layer rows"),
    ("extra-float16", "asym", _blob("layers.0.0.bn1.running_var", lambda b: b.half()),
     r"tensor 'layers.0.0.bn1.running_var' must be torch.float32 of shape \[4\]"),
    ("extra-float64", "asym", _blob("bn1.weight", lambda b: b.double()), "tensor 'bn1.weight' must be torch.float32"),
    ("extra-shape", "asym", _blob("bn1.bias", lambda b: b[:-1].clone()),
     r"tensor 'bn1.bias' must be torch.float32 of shape \[4\]"),
    ("extra-int-dtype", "asym", _blob("bn1.num_batches_tracked", lambda b: b.float()),
     "tensor 'bn1.num_batches_tracked' must be torch.int64"),
    ("extra-missing", "asym", _drop("bn1.running_mean"), r"missing \['bn1.running_mean'\]"),
    # version 5: codes at each channel's own width, zero points of the unpruned channels only
    ("dense-codes-short", "chan", _blob("codes1", lambda b: b[:-1].clone()), "codes1 blob is too short"),
    ("dense-codes-long", "chan", _blob("codes3", lambda b: torch.cat([b, b[:1]])), "codes3 blob is longer"),
    ("dense-codes-missing", "chan", _drop("codes1"), "no codes1 blob for its 1-bit layers"),
    ("dense-out-of-narrow-range", "chan", _blob("codes2", lambda b: torch.full_like(b, 255)),
     rf"layer '{BODY}': weight codes outside their channel's range \(group_bits\): group 1 \(2 bits\) holds 2, "
     "above its top 1"),
    ("dense-zp-range", "chanasym", (BODY, "weight_quant.zero_point", 16.0, 2),
     r"weight_quant.zero_point must be integers in the code range \[0, 15\]"),
    ("dense-params-short", "chanasym", _blob(PARAMS_KEY, lambda b: b[:-1].clone()), "params blob is too short"),
]


@pytest.mark.parametrize("case", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_tensors_are_checked(sources, tmp_path, case) -> None:
    name, which, change, message = case
    src = sources[which]
    if isinstance(change, tuple):
        change = _set_param(src, *change)
    path = src.write(tmp_path / "m.lowbit", tensors=change)
    with pytest.raises(LowbitError) as info:
        lowbit.load(path, model=src.model)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


META_CASES = [
    ("format", {"format": "lowbit"}, "is not a lowbit artifact .format tag 'lowbit'"),
    ("version-6", {"version": "6"}, "artifact version '6' is not supported"),
    ("version-1-of-a-v2-manifest", {"version": "1"}, "'layers' is missing or damaged"),
    ("manifest-not-json", {"manifest": "{"}, "manifest is missing or damaged .not JSON"),
    ("manifest-deep", {"manifest": "[" * 100_000 + "]" * 100_000}, "manifest is missing or damaged"),
    ("manifest-list", {"manifest": "[]"}, "manifest is missing or damaged .a JSON object"),
]


@pytest.mark.parametrize("case", META_CASES, ids=[c[0] for c in META_CASES])
def test_format_version_and_manifest_tags_are_checked(sources, tmp_path, case) -> None:
    _, changes, message = case
    path = sources["sym"].write(tmp_path / "m.lowbit", meta=lambda d: d.update(changes))
    with pytest.raises(LowbitError, match=message):
        lowbit.load(path, model=sources["sym"].model)


# ---------------------------------------------------------------- version 1

@pytest.fixture(scope="module")
def version1(sources, tmp_path_factory) -> tuple[dict, dict]:
    """The symmetric artifact in the version-1 layout (expanded manifest, one tensor per field)."""
    manifest, tensors = read_artifact(sources["sym"].path)
    old = {k: manifest[k] for k in ("arch", "method", "config", "options", "fold_pairs", "layers")}
    for spec in old["layers"].values():  # version 1 named kinds "conv"/"linear" and had no out_channels
        spec["kind"] = {"conv2d": "conv", "linear": "linear"}[spec["kind"]]
        del spec["out_channels"]
    return old, tensors


def _write_v1(old: dict, tensors: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT, "version": "1", "manifest": json.dumps(old)})
    return path


def _v1_spec(key: str, value: Any) -> Callable[[dict, dict], None]:
    return lambda m, t: m["layers"][BODY].__setitem__(key, value)


V1_CASES = [
    ("flag-not-bool", _v1_spec("w_enabled", 1), f"layer '{BODY}': w_enabled must be true or false, got 1"),
    ("derived-inconsistent", _v1_spec("w_narrow", False), "w_narrow must be True .from the config and the layer"),
    ("w_qmin-inconsistent", _v1_spec("w_qmin", -8), "w_qmin must be -7"),
    ("a_bits-99", _v1_spec("a_bits", 99), "a_bits must be an integer 1..16 or null, got 99"),
    ("keys", lambda m, t: m["layers"][BODY].pop("kind"), "a version-1 entry must have exactly the keys"),
    ("layers-list", lambda m, t: m.__setitem__("layers", []), "'layers' is missing or damaged"),
    ("scale-nan", lambda m, t: t.__setitem__(f"{BODY}.weight_quant.scale", torch.full((4,), math.nan)),
     "weight_quant.scale must be finite and > 0"),
    ("scale-broadcast", lambda m, t: t.__setitem__(f"{BODY}.weight_quant.scale", torch.ones(1)),
     rf"tensor '{BODY}.weight_quant.scale' must be torch.float32 of shape \[4\]"),
    ("codes-dtype", lambda m, t: t.__setitem__(f"{BODY}.weight.codes", t[f"{BODY}.weight.codes"].to(torch.int16)),
     "weight.codes' must be torch.uint8"),
    ("codes-missing", lambda m, t: t.pop(f"{BODY}.weight.codes"), f"tensor '{BODY}.weight.codes' is missing"),
    ("float-weight-beside-codes", lambda m, t: t.__setitem__(f"{BODY}.weight", torch.zeros(4, 4, 3, 3)),
     "holds both its weight codes and a float weight"),
    ("fold-pair-relu", lambda m, t: m.__setitem__("fold_pairs", [["conv1", "relu"]] + m["fold_pairs"][1:]),
     "'relu' is a ReLU, not a BatchNorm"),
]


@pytest.mark.parametrize("case", V1_CASES, ids=[c[0] for c in V1_CASES])
def test_version_1_files_are_checked_too(sources, version1, tmp_path, case) -> None:
    _, change, message = case
    old, tensors = copy.deepcopy(version1[0]), dict(version1[1])
    change(old, tensors)
    path = _write_v1(old, tensors, tmp_path / "v1.lowbit")
    with pytest.raises(LowbitError, match=message):
        lowbit.load(path, model=sources["sym"].model)


def test_untouched_version_1_file_loads(sources, version1, tmp_path) -> None:
    path = _write_v1(*copy.deepcopy(version1), tmp_path / "v1.lowbit")
    src = sources["sym"]
    with torch.no_grad():
        assert torch.equal(lowbit.load(path, model=src.model)(src.images), src.expected)


# ---------------------------------------------------------------- architecture from the manifest

@pytest.mark.parametrize("arch, message", [
    ({"name": "nope", "kwargs": {}}, "unknown model 'nope'"),
    ({"name": "resnet20", "kwargs": {"width": "4"}}, "arch: cannot build resnet20 with arguments"),
    ({"name": "resnet20", "kwargs": {"depth": 3}}, "arch: cannot build resnet20 with arguments .*depth"),
    ({"name": "resnet20", "kwargs": {"width": 8}}, "shape or groups differ"),
    (None, "pass model="),
], ids=["unknown", "kwarg-type", "kwarg-unknown", "other-width", "none"])
def test_zoo_architecture_is_resolved_by_name_only(sources, tmp_path, arch, message) -> None:
    path = sources["sym"].write(tmp_path / "m.lowbit", manifest=key(("arch",), arch))
    with pytest.raises(LowbitError, match=message):
        lowbit.load(path)


# ---------------------------------------------------------------- valid variants still load

class WithUnusedLayer(nn.Module):
    """A conv that is defined but never called: its row is 'unused' and its weight stays float."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.spare = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_unused_layers_and_reexports_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = WithUnusedLayer().eval()
    q = lowbit.quantize(model, calib_tensor(8), w_bits=4, a_bits=4)
    manifest, _ = read_artifact(lowbit.export(q, tmp_path / "a.lowbit"))
    assert manifest["layers"]["spare"]["role"] == "unused"
    x = calib_tensor(4, seed=2)
    loaded = lowbit.load(tmp_path / "a.lowbit", model=model)
    again = lowbit.load(lowbit.export(loaded, tmp_path / "b.lowbit"), model=model)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x)) and torch.equal(again(x), q(x))
