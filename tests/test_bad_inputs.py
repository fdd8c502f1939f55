"""The bad-input matrix: every way a careless or hostile user can call lowbit ends in a clear error.

API cases must raise ``lowbit.LowbitError`` (never a raw TypeError/KeyError/OSError, never a
silent result) and must leave the caller's FP model untouched. CLI cases must exit with code 2,
print exactly one line, ``lowbit: error: ...``, on stderr, and no traceback.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lowbit
from lowbit import LowbitError
from lowbit.cli import main
from tests.conftest import calib_tensor, make_zoo


# ----------------------------------------------------------------------------- shared material

class Ctx:
    """Everything the cases need, built once per module (tiny ResNet-20, 16 images, 1 artifact)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = make_zoo("resnet20")
        self.x = calib_tensor(16)
        self.y = torch.arange(16) % 10
        self.q = lowbit.quantize(self.model, self.x, w_bits=4, a_bits=4)
        self.artifact = lowbit.export(self.q, root / "good.lowbit")
        self.onnx = lowbit.export(self.q, root / "good.onnx")
        with safe_open(str(self.artifact), framework="pt") as f:
            self.meta = dict(f.metadata())
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.a_file = root / "a_file"
        self.a_file.write_text("not a folder")
        self.count = 0

    def path(self, name: str) -> Path:
        self.count += 1
        return self.root / f"{self.count}_{name}"

    def write(self, name: str, data: bytes) -> Path:
        p = self.path(name)
        p.write_bytes(data)
        return p

    def tampered(self, manifest_fn: Callable[[dict], Any] | None = None,
                 tensors_fn: Callable[[dict], Any] | None = None, meta_fn: Callable[[dict], Any] | None = None) -> Path:
        """A copy of the good artifact with its manifest, tensors or metadata changed."""
        meta = dict(self.meta)
        manifest = json.loads(meta["manifest"])
        tensors = {k: v.clone() for k, v in self.tensors.items()}
        if manifest_fn:
            manifest_fn(manifest)
        if tensors_fn:
            tensors_fn(tensors)
        meta["manifest"] = json.dumps(manifest)
        if meta_fn:
            meta_fn(meta)
        p = self.path("tampered.lowbit")
        save_file(tensors, str(p), metadata=meta)
        return p

    def load(self, path: Path, **kw) -> nn.Module:
        return lowbit.load(path, model=kw.pop("model", self.model), **kw)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    return Ctx(tmp_path_factory.mktemp("bad_inputs"))


def _row(manifest: dict, index: int = 0) -> dict[str, Any]:
    """View of one manifest row as {field: position} for targeted edits."""
    return {f: i for i, f in enumerate(manifest["fields"])}


def set_field(field: str, value: Any, index: int = 0) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["layers"][index][_row(m)[field]] = value
    return edit


def set_field_where(field: str, value: Any, pred: Callable[[dict, list], bool]) -> Callable[[dict], None]:
    """Set ``field`` on the first row for which ``pred(positions, row)`` holds."""
    def edit(m: dict) -> None:
        pos = _row(m)
        row = next(r for r in m["layers"] if pred(pos, r))
        row[pos[field]] = value
    return edit


def act_row(pos: dict, r: list) -> bool:
    return bool(r[pos["a"]])


def set_config(key: str, value: Any) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["config"][key] = value
    return edit


def drop_key(key: str) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        del m[key]
    return edit


def set_key(key: str, value: Any) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m[key] = value
    return edit


def edit_params(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t["params"] = fn(t["params"])
    return edit


def first_codes(t: dict) -> str:
    return next(k for k in sorted(t) if k.startswith("codes"))


def edit_codes(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        k = first_codes(t)
        t[k] = fn(t[k])
    return edit


def set_first(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(p: torch.Tensor) -> torch.Tensor:
        p = p.clone()
        p[0] = value
        return p
    return fn


class BadLoader:
    """A DataLoader-like iterable that yields (label, image): labels first, the classic mix-up."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(0, len(self.x), 4):
            yield self.y[i:i + 4], self.x[i:i + 4]


class NoConv(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class RaisesInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        raise RuntimeError("boom in user forward")


Q = lowbit.quantize

# (case id, callable(ctx)) — each must raise LowbitError.
API_CASES: list[tuple[str, Callable[[Ctx], Any]]] = [
    # --- model argument
    ("model-none", lambda c: Q(None, c.x)),
    ("model-int", lambda c: Q(3, c.x)),
    ("model-str", lambda c: Q("resnet20", c.x)),
    ("model-class-not-instance", lambda c: Q(nn.Conv2d, c.x)),
    ("model-no-layers", lambda c: Q(NoConv(), c.x)),
    ("model-empty-sequential", lambda c: Q(nn.Sequential(), c.x)),
    ("model-forward-raises", lambda c: Q(RaisesInForward(), c.x)),
    ("model-wrong-channels", lambda c: Q(c.model, calib_tensor(4, channels=3))),
    # --- bit widths
    ("w-bits-0", lambda c: Q(c.model, c.x, w_bits=0)),
    ("w-bits-17", lambda c: Q(c.model, c.x, w_bits=17)),
    ("w-bits-neg", lambda c: Q(c.model, c.x, w_bits=-2)),
    ("w-bits-float", lambda c: Q(c.model, c.x, w_bits=2.5)),
    ("w-bits-str", lambda c: Q(c.model, c.x, w_bits="4")),
    ("w-bits-bool", lambda c: Q(c.model, c.x, w_bits=True)),
    ("w-bits-none", lambda c: Q(c.model, c.x, w_bits=None)),
    ("w-bits-list", lambda c: Q(c.model, c.x, w_bits=[4])),
    ("a-bits-0", lambda c: Q(c.model, c.x, a_bits=0)),
    ("a-bits-99", lambda c: Q(c.model, c.x, a_bits=99)),
    ("a-bits-float", lambda c: Q(c.model, c.x, a_bits=3.0)),
    ("a-bits-str", lambda c: Q(c.model, c.x, a_bits="8")),
    ("a-bits-bool", lambda c: Q(c.model, c.x, a_bits=False)),
    ("first-last-bits-0", lambda c: Q(c.model, c.x, first_last_bits=0)),
    ("first-last-bits-str", lambda c: Q(c.model, c.x, first_last_bits="8")),
    # --- method
    ("method-unknown", lambda c: Q(c.model, c.x, method="nope")),
    ("method-empty", lambda c: Q(c.model, c.x, method="")),
    ("method-none", lambda c: Q(c.model, c.x, method=None)),
    ("method-int", lambda c: Q(c.model, c.x, method=3)),
    ("method-qat-name", lambda c: Q(c.model, c.x, method="lsq")),
    # --- config options of the wrong type or value
    ("opt-unknown", lambda c: Q(c.model, c.x, bogus=1)),
    ("opt-unknown-for-method", lambda c: Q(c.model, c.x, method="minmax", iters=3)),
    ("fold-bn-str", lambda c: Q(c.model, c.x, fold_bn="no")),
    ("fold-bn-int", lambda c: Q(c.model, c.x, fold_bn=0)),
    ("w-symmetric-str", lambda c: Q(c.model, c.x, w_symmetric="False")),
    ("w-narrow-str", lambda c: Q(c.model, c.x, w_narrow="yes")),
    ("a-symmetric-str", lambda c: Q(c.model, c.x, a_symmetric="no")),
    ("quantize-all-str", lambda c: Q(c.model, c.x, quantize_all="no")),
    ("quantize-input-str", lambda c: Q(c.model, c.x, quantize_input="yes")),
    ("equalize-str", lambda c: Q(c.model, c.x, equalize="true")),
    ("progress-str", lambda c: Q(c.model, c.x, progress="yes")),
    ("granularity-unknown", lambda c: Q(c.model, c.x, granularity="layer-wise")),
    ("granularity-int", lambda c: Q(c.model, c.x, granularity=1)),
    ("groups-without-group", lambda c: Q(c.model, c.x, groups=4)),
    ("groups-zero", lambda c: Q(c.model, c.x, granularity="group", groups=0)),
    ("groups-neg", lambda c: Q(c.model, c.x, granularity="group", groups=-1)),
    ("groups-float", lambda c: Q(c.model, c.x, granularity="group", groups=2.5)),
    ("groups-str", lambda c: Q(c.model, c.x, granularity="group", groups="4")),
    ("group-without-groups", lambda c: Q(c.model, c.x, granularity="group")),
    ("calib-size-0", lambda c: Q(c.model, c.x, calib_size=0)),
    ("calib-size-neg", lambda c: Q(c.model, c.x, calib_size=-1)),
    ("calib-size-str", lambda c: Q(c.model, c.x, calib_size="10")),
    ("calib-size-float", lambda c: Q(c.model, c.x, calib_size=8.5)),
    ("batch-size-0", lambda c: Q(c.model, c.x, batch_size=0)),
    ("batch-size-float", lambda c: Q(c.model, c.x, batch_size=2.5)),
    ("seed-str", lambda c: Q(c.model, c.x, seed="a")),
    ("seed-float", lambda c: Q(c.model, c.x, seed=1.5)),
    ("device-unknown", lambda c: Q(c.model, c.x, device="tpu")),
    ("device-int-str", lambda c: Q(c.model, c.x, device="gpu0")),
    ("device-list", lambda c: Q(c.model, c.x, device=["cpu"])),
    ("config-not-config", lambda c: Q(c.model, c.x, config={"w_bits": 4})),
    # --- method options of the wrong type or value
    ("mse-candidates-float", lambda c: Q(c.model, c.x, method="mse", candidates=2.5)),
    ("mse-candidates-0", lambda c: Q(c.model, c.x, method="mse", candidates=0)),
    ("mse-p-str", lambda c: Q(c.model, c.x, method="mse", p_act="2.4")),
    ("mse-shrink-str", lambda c: Q(c.model, c.x, method="mse", shrink="0.01")),
    ("aciq-dist-unknown", lambda c: Q(c.model, c.x, method="aciq", dist="cauchy")),
    ("aciq-dist-int", lambda c: Q(c.model, c.x, method="aciq", dist=1)),
    ("bitsplit-iters-str", lambda c: Q(c.model, c.x, method="bitsplit", iters="4")),
    ("bitsplit-iters-0", lambda c: Q(c.model, c.x, method="bitsplit", iters=0)),
    ("bitsplit-samples-float", lambda c: Q(c.model, c.x, method="bitsplit", samples=10.5)),
    ("bitsplit-ec-str", lambda c: Q(c.model, c.x, method="bitsplit", error_compensation="no")),
    ("bitsplit-act-method-unknown", lambda c: Q(c.model, c.x, method="bitsplit", act_method="magic")),
    ("bitsplit-fit-dtype-unknown", lambda c: Q(c.model, c.x, method="bitsplit", fit_dtype="int8")),
    ("brecq-iters-str", lambda c: Q(c.model, c.x, method="brecq", iters="4")),
    ("brecq-lr-str", lambda c: Q(c.model, c.x, method="brecq", lr="fast")),
    ("brecq-batch-0", lambda c: Q(c.model, c.x, method="brecq", batch_size=0)),
    ("qdrop-prob-2", lambda c: Q(c.model, c.x, method="qdrop", drop_prob=2.0)),
    ("qdrop-prob-str", lambda c: Q(c.model, c.x, method="qdrop", drop_prob="half")),
    ("distill-iters-float", lambda c: Q(c.model, c.x, method="distill", block_iters=1.5)),
    ("distill-augment-str", lambda c: Q(c.model, c.x, method="distill", augment="yes")),
    # --- calibration data
    ("calib-none", lambda c: Q(c.model, None)),
    ("calib-int", lambda c: Q(c.model, 3)),
    ("calib-str", lambda c: Q(c.model, "images/")),
    ("calib-empty-tensor", lambda c: Q(c.model, torch.zeros(0, 1, 16, 16))),
    ("calib-empty-list", lambda c: Q(c.model, [])),
    ("calib-2d", lambda c: Q(c.model, torch.randn(16, 256))),
    ("calib-5d", lambda c: Q(c.model, torch.randn(2, 1, 1, 16, 16))),
    ("calib-int-dtype", lambda c: Q(c.model, torch.randint(0, 255, (4, 1, 16, 16)))),
    ("calib-bool", lambda c: Q(c.model, torch.ones(4, 1, 16, 16, dtype=torch.bool))),
    ("calib-complex", lambda c: Q(c.model, torch.randn(4, 1, 16, 16, dtype=torch.complex64))),
    ("calib-nan", lambda c: Q(c.model, c.x.clone().fill_(float("nan")))),
    ("calib-inf", lambda c: Q(c.model, torch.where(c.x > 2, float("inf"), c.x))),
    ("calib-list-of-str", lambda c: Q(c.model, ["a", "b"])),
    ("calib-list-mixed-shapes", lambda c: Q(c.model, [c.x[:4], calib_tensor(4, size=12)])),
    ("calib-generator-of-ints", lambda c: Q(c.model, (i for i in range(4)))),
    ("calib-labels-only", lambda c: Q(c.model, c.y)),
    ("calib-label-image-loader", lambda c: Q(c.model, BadLoader(c.x, c.y))),
    ("calib-pair-swapped", lambda c: Q(c.model, (c.y, c.x))),
    ("calib-dict-no-key", lambda c: Q(c.model, [{"image": c.x[:4], "label": c.y[:4]}])),
    ("calib-dict-wrong-key", lambda c: Q(c.model, [{"image": c.x[:4]}], input_key="img")),
    ("calib-dataset-of-labels", lambda c: Q(c.model, DataLoader(TensorDataset(c.y.float()), batch_size=4))),
    # --- export
    ("export-fp-model", lambda c: lowbit.export(c.model, c.path("fp.lowbit"))),
    ("export-not-module", lambda c: lowbit.export("model", c.path("x.lowbit"))),
    ("export-tflite", lambda c: lowbit.export(c.q, c.path("m.tflite"))),
    ("export-pt", lambda c: lowbit.export(c.q, c.path("m.pt"))),
    ("export-to-dir", lambda c: lowbit.export(c.q, c.root)),
    ("export-parent-is-file", lambda c: lowbit.export(c.q, c.a_file / "m.lowbit")),
    ("export-onnx-parent-is-file", lambda c: lowbit.export(c.q, c.a_file / "m.onnx")),
    ("export-onnx-option-on-lowbit", lambda c: lowbit.export(c.q, c.path("m.lowbit"), opset=21)),
    ("export-onnx-unknown-option", lambda c: lowbit.export(c.q, c.path("m.onnx"), bogus=1)),
    ("export-onnx-bad-input-shape", lambda c: lowbit.export(c.q, c.path("m.onnx"), input_shape=(3, 5))),
    ("export-onnx-bad-opset", lambda c: lowbit.export(c.q, c.path("m.onnx"), opset="new")),
    # --- integer path
    ("integer-fp-model", lambda c: lowbit.integer_model(c.model)),
    ("integer-not-module", lambda c: lowbit.integer_model("q")),
    ("integer-bias-bits-neg", lambda c: lowbit.integer_model(c.q, bias_frac_bits=-1)),
    ("integer-bias-bits-str", lambda c: lowbit.integer_model(c.q, bias_frac_bits="8")),
    # --- load: files that are not artifacts
    ("load-missing", lambda c: c.load(c.root / "missing.lowbit")),
    ("load-directory", lambda c: c.load(c.root)),
    ("load-empty-file", lambda c: c.load(c.write("empty.lowbit", b""))),
    ("load-random-bytes", lambda c: c.load(c.write("random.lowbit", os.urandom(4096)))),
    ("load-truncated", lambda c: c.load(c.write("trunc.lowbit", c.artifact.read_bytes()[:len(c.artifact.read_bytes()) // 2]))),
    ("load-truncated-header", lambda c: c.load(c.write("trunc8.lowbit", c.artifact.read_bytes()[:8]))),
    ("load-json-file", lambda c: c.load(c.write("m.json", json.dumps({"format": "lowbit-artifact"}).encode()))),
    ("load-gzip", lambda c: c.load(c.write("m.lowbit.gz", gzip.compress(c.artifact.read_bytes())))),
    ("load-onnx-file", lambda c: c.load(c.onnx)),
    ("load-plain-safetensors", lambda c: c.load(_plain_safetensors(c))),
    ("load-torch-pickle", lambda c: c.load(_torch_pickle(c))),
    # --- load: arguments
    ("load-model-str", lambda c: lowbit.load(c.artifact, model="resnet20")),
    ("load-model-no-layers", lambda c: lowbit.load(c.artifact, model=NoConv())),
    ("load-model-other-arch", lambda c: lowbit.load(c.artifact, model=make_zoo("mobilenetv2"))),
    ("load-model-other-width", lambda c: lowbit.load(c.artifact, model=lowbit.create_model("resnet20", width=8))),
    ("load-device-unknown", lambda c: c.load(c.artifact, device="tpu")),
    ("load-device-int", lambda c: c.load(c.artifact, device=["cpu"])),
    # --- load: tampered metadata and manifest
    ("tamper-format", lambda c: c.load(c.tampered(meta_fn=lambda m: m.update(format="other")))),
    ("tamper-version", lambda c: c.load(c.tampered(meta_fn=lambda m: m.update(version="99")))),
    ("tamper-no-manifest", lambda c: c.load(c.tampered(meta_fn=lambda m: m.pop("manifest")))),
    ("tamper-manifest-not-json", lambda c: c.load(c.tampered(meta_fn=lambda m: m.update(manifest="{oops")))),
    ("tamper-manifest-list", lambda c: c.load(c.tampered(meta_fn=lambda m: m.update(manifest="[]")))),
    ("tamper-no-layers", lambda c: c.load(c.tampered(drop_key("layers")))),
    ("tamper-no-fields", lambda c: c.load(c.tampered(drop_key("fields")))),
    ("tamper-no-config", lambda c: c.load(c.tampered(drop_key("config")))),
    ("tamper-config-str", lambda c: c.load(c.tampered(set_key("config", "w4a4")))),
    ("tamper-config-bits-str", lambda c: c.load(c.tampered(set_config("w_bits", "4")))),
    ("tamper-config-granularity", lambda c: c.load(c.tampered(set_config("granularity", "bogus")))),
    ("tamper-config-symmetric-str", lambda c: c.load(c.tampered(set_config("w_symmetric", "yes")))),
    ("tamper-config-a-symmetric-flip", lambda c: c.load(c.tampered(set_config("w_symmetric", False)))),
    ("tamper-input-shape", lambda c: c.load(c.tampered(set_key("input_shape", "abc")))),
    ("tamper-input-shape-neg", lambda c: c.load(c.tampered(set_key("input_shape", [1, -16, 16])))),
    ("tamper-arch-unknown", lambda c: lowbit.load(c.tampered(set_key("arch", {"name": "os.system"})))),
    ("tamper-arch-str", lambda c: lowbit.load(c.tampered(set_key("arch", "resnet20")))),
    ("tamper-row-short", lambda c: c.load(c.tampered(lambda m: m["layers"][0].pop()))),
    ("tamper-name-unknown", lambda c: c.load(c.tampered(set_field("name", "no.such.layer")))),
    ("tamper-name-int", lambda c: c.load(c.tampered(set_field("name", 7)))),
    ("tamper-role", lambda c: c.load(c.tampered(set_field("role", "boss")))),
    ("tamper-shape", lambda c: c.load(c.tampered(set_field("shape", [4, 1, 5, 5])))),
    ("tamper-shape-neg", lambda c: c.load(c.tampered(set_field("shape", [-4, 1, 3, 3])))),
    ("tamper-groups-neg", lambda c: c.load(c.tampered(set_field("groups", -1)))),
    ("tamper-groups-zero", lambda c: c.load(c.tampered(set_field("groups", 0)))),
    ("tamper-groups-str", lambda c: c.load(c.tampered(set_field("groups", "4")))),
    ("tamper-w-bits-0", lambda c: c.load(c.tampered(set_field("w_bits", 0)))),
    ("tamper-w-bits-99", lambda c: c.load(c.tampered(set_field("w_bits", 99)))),
    ("tamper-w-bits-none", lambda c: c.load(c.tampered(set_field("w_bits", None)))),
    ("tamper-w-bits-str", lambda c: c.load(c.tampered(set_field("w_bits", "8")))),
    ("tamper-w-flag-2", lambda c: c.load(c.tampered(set_field("w", 2)))),
    ("tamper-a-bits-0", lambda c: c.load(c.tampered(set_field_where("a_bits", 0, act_row)))),
    ("tamper-a-bits-99", lambda c: c.load(c.tampered(set_field_where("a_bits", 99, act_row)))),
    ("tamper-a-bits-none", lambda c: c.load(c.tampered(set_field_where("a_bits", None, act_row)))),
    ("tamper-a-signed-flip", lambda c: c.load(c.tampered(set_field_where("a_signed", 1, act_row)))),
    ("tamper-a-signed-str", lambda c: c.load(c.tampered(set_field_where("a_signed", "yes", act_row)))),
    ("tamper-bn-names-relu", lambda c: c.load(c.tampered(set_field("bn", "relu")))),
    ("tamper-bn-missing", lambda c: c.load(c.tampered(set_field("bn", "no_such_bn")))),
    ("tamper-bn-other-size", lambda c: c.load(c.tampered(set_field("bn", "layers.2.0.bn2")))),
    # --- load: tampered tensors
    ("tamper-params-nan", lambda c: c.load(c.tampered(tensors_fn=edit_params(lambda p: torch.full_like(p, float("nan")))))),
    ("tamper-params-zero", lambda c: c.load(c.tampered(tensors_fn=edit_params(torch.zeros_like)))),
    ("tamper-params-negative", lambda c: c.load(c.tampered(tensors_fn=edit_params(lambda p: -p.abs() - 1)))),
    ("tamper-first-scale-nan", lambda c: c.load(c.tampered(tensors_fn=edit_params(set_first(float("nan")))))),
    ("tamper-first-scale-zero", lambda c: c.load(c.tampered(tensors_fn=edit_params(set_first(0.0))))),
    ("tamper-first-scale-neg", lambda c: c.load(c.tampered(tensors_fn=edit_params(set_first(-1.0))))),
    ("tamper-first-scale-inf", lambda c: c.load(c.tampered(tensors_fn=edit_params(set_first(float("inf")))))),
    ("tamper-params-truncated", lambda c: c.load(c.tampered(tensors_fn=edit_params(lambda p: p[:-1])))),
    ("tamper-params-extra", lambda c: c.load(c.tampered(tensors_fn=edit_params(lambda p: torch.cat([p, p[:1]]))))),
    ("tamper-params-float64", lambda c: c.load(c.tampered(tensors_fn=edit_params(lambda p: p.double())))),
    ("tamper-params-2d", lambda c: c.load(c.tampered(tensors_fn=edit_params(lambda p: p.reshape(1, -1))))),
    ("tamper-codes-truncated", lambda c: c.load(c.tampered(tensors_fn=edit_codes(lambda t: t[:-1])))),
    ("tamper-codes-extra", lambda c: c.load(c.tampered(tensors_fn=edit_codes(lambda t: torch.cat([t, t[:1]]))))),
    ("tamper-codes-float", lambda c: c.load(c.tampered(tensors_fn=edit_codes(lambda t: t.float())))),
    ("tamper-codes-int64", lambda c: c.load(c.tampered(tensors_fn=edit_codes(lambda t: t.long())))),
    ("tamper-codes-missing", lambda c: c.load(c.tampered(tensors_fn=lambda t: t.pop(first_codes(t))))),
    ("tamper-codes-unused-blob", lambda c: c.load(c.tampered(tensors_fn=lambda t: t.update(codes3=torch.zeros(3, dtype=torch.uint8))))),
    ("tamper-params-missing", lambda c: c.load(c.tampered(tensors_fn=lambda t: t.pop("params")))),
    ("tamper-extra-tensor", lambda c: c.load(c.tampered(tensors_fn=lambda t: t.update(evil=torch.zeros(3))))),
    # --- QAT arguments
    ("qat-data-none", lambda c: lowbit.qat(c.model, None, epochs=1)),
    ("qat-data-no-labels", lambda c: lowbit.qat(c.model, c.x, epochs=1)),
    ("qat-labels-float", lambda c: lowbit.qat(c.model, (c.x, c.y.float() + 0.5), epochs=1)),
    ("qat-labels-length", lambda c: lowbit.qat(c.model, (c.x, c.y[:5]), epochs=1)),
    ("qat-labels-2d", lambda c: lowbit.qat(c.model, (c.x, c.y.view(4, 4)), epochs=1)),
    ("qat-pair-swapped", lambda c: lowbit.qat(c.model, (c.y, c.x), epochs=1)),
    ("qat-method-unknown", lambda c: lowbit.qat(c.model, (c.x, c.y), method="nope", epochs=1)),
    ("qat-method-ptq", lambda c: lowbit.qat(c.model, (c.x, c.y), method="minmax", epochs=1)),
    ("qat-epochs-0", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=0)),
    ("qat-epochs-neg", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=-1)),
    ("qat-epochs-float", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1.5)),
    ("qat-epochs-str", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs="2")),
    ("qat-lr-str", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1, lr="fast")),
    ("qat-batch-0", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1, batch_size=0)),
    ("qat-optimizer-unknown", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1, optimizer="rmsprop")),
    ("qat-schedule-unknown", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1, schedule="sawtooth")),
    ("qat-augment-str", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1, augment="no")),
    ("qat-resume-str", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1, resume="no")),
    ("qat-unknown-option", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1, bogus=1)),
    ("qat-w-bits-0", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1, w_bits=0)),
    ("qat-gdrq-groups-no-group", lambda c: lowbit.qat(c.model, (c.x, c.y), method="gdrq", epochs=1, groups=4)),
    ("qat-checkpoint-is-dir", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1, checkpoint=str(c.root))),
    ("qat-checkpoint-not-a-checkpoint", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1, resume=True,
                                                             checkpoint=str(c.write("ck.pt", b"garbage")))),
    ("qat-checkpoint-parent-is-file", lambda c: lowbit.qat(c.model, (c.x, c.y), epochs=1,
                                                           checkpoint=str(c.a_file / "ck.pt"))),
    # --- models and data helpers
    ("create-model-unknown", lambda c: lowbit.create_model("nope")),
    ("create-model-bad-kwarg", lambda c: lowbit.create_model("resnet20", bogus=1)),
    ("create-model-bad-kwarg-type", lambda c: lowbit.create_model("resnet20", width="wide")),
    ("create-model-int", lambda c: lowbit.create_model(3)),
    ("load-pretrained-unknown", lambda c: lowbit.load_pretrained("nope")),
    ("load-pretrained-no-checkpoint", lambda c: lowbit.load_pretrained("resnet18")),
    ("image-folder-missing", lambda c: lowbit.data.load_image_folder(c.root / "no_images_here")),
    ("image-folder-empty", lambda c: lowbit.data.load_image_folder(_empty_dir(c))),
    ("image-folder-is-file", lambda c: lowbit.data.load_image_folder(c.a_file)),
    ("image-folder-broken-image", lambda c: lowbit.data.load_image_folder(_broken_images(c))),
    ("fmnist-bad-split", lambda c: lowbit.data.load_fashion_mnist("validation")),
    ("fmnist-missing-root", lambda c: lowbit.data.load_fashion_mnist("test", c.root / "no_fmnist")),
    ("fmnist-root-without-files", lambda c: lowbit.data.load_fashion_mnist("test", _empty_dir(c))),
    ("sample-calibration-too-many", lambda c: lowbit.data.sample_calibration(c.x, 100)),
    ("sample-calibration-zero", lambda c: lowbit.data.sample_calibration(c.x, 0)),
]


def _plain_safetensors(c: Ctx) -> Path:
    p = c.path("plain.safetensors")
    save_file({"w": torch.zeros(3)}, str(p))
    return p


def _torch_pickle(c: Ctx) -> Path:
    p = c.path("pickled.lowbit")
    torch.save(c.q.state_dict(), p)
    return p


def _empty_dir(c: Ctx) -> Path:
    p = c.path("empty_dir")
    p.mkdir()
    return p


def _broken_images(c: Ctx) -> Path:
    p = c.path("broken_images")
    (p / "cls").mkdir(parents=True)
    (p / "cls" / "a.png").write_bytes(b"\x89PNG not really")
    return p


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", [fn for _, fn in API_CASES], ids=[name for name, _ in API_CASES])
def test_api_bad_input_raises_lowbit_error(ctx, case):
    before = _state(ctx.model)
    with pytest.raises(LowbitError):
        case(ctx)
    after = ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed call changed the caller's model"


def test_api_case_ids_are_unique():
    names = [name for name, _ in API_CASES]
    assert len(names) == len(set(names))


# ----------------------------------------------------------------------------- CLI

def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


CLI_QUANT = ["--model", "resnet20", "--no-progress"]

CLI_CASES: list[tuple[str, Callable[[Path], list[str]]]] = [
    ("no-command", lambda d: []),
    ("unknown-command", lambda d: ["frobnicate"]),
    ("methods-unknown-flag", lambda d: ["methods", "--bogus"]),
    ("models-extra-arg", lambda d: ["models", "extra"]),
    ("quantize-no-model", lambda d: ["quantize"]),
    ("quantize-unknown-model", lambda d: ["quantize", "--model", "nope"]),
    ("quantize-w-bits-0", lambda d: ["quantize", *CLI_QUANT, "--w-bits", "0"]),
    ("quantize-w-bits-17", lambda d: ["quantize", *CLI_QUANT, "--w-bits", "17"]),
    ("quantize-w-bits-text", lambda d: ["quantize", *CLI_QUANT, "--w-bits", "four"]),
    ("quantize-w-bits-float", lambda d: ["quantize", *CLI_QUANT, "--w-bits", "2.5"]),
    ("quantize-a-bits-text", lambda d: ["quantize", *CLI_QUANT, "--a-bits", "x"]),
    ("quantize-a-bits-0", lambda d: ["quantize", *CLI_QUANT, "--a-bits", "0"]),
    ("quantize-method-unknown", lambda d: ["quantize", *CLI_QUANT, "--method", "nope"]),
    ("quantize-method-qat", lambda d: ["quantize", *CLI_QUANT, "--method", "lsq"]),
    ("quantize-granularity", lambda d: ["quantize", *CLI_QUANT, "--granularity", "layer"]),
    ("quantize-groups-0", lambda d: ["quantize", *CLI_QUANT, "--groups", "0"]),
    ("quantize-groups-neg", lambda d: ["quantize", *CLI_QUANT, "--groups", "-2"]),
    ("quantize-groups-text", lambda d: ["quantize", *CLI_QUANT, "--groups", "many"]),
    ("quantize-calib-size-0", lambda d: ["quantize", *CLI_QUANT, "--calib-size", "0"]),
    ("quantize-calib-size-neg", lambda d: ["quantize", *CLI_QUANT, "--calib-size", "-5"]),
    ("quantize-eval-size-0", lambda d: ["quantize", *CLI_QUANT, "--eval-size", "0"]),
    ("quantize-eval-size-neg", lambda d: ["quantize", *CLI_QUANT, "--eval-size", "-3"]),
    ("quantize-seed-text", lambda d: ["quantize", *CLI_QUANT, "--seed", "a"]),
    ("quantize-device-unknown", lambda d: ["quantize", *CLI_QUANT, "--device", "tpu"]),
    ("quantize-data-missing", lambda d: ["quantize", *CLI_QUANT, "--data", str(d / "no_fmnist")]),
    ("quantize-calib-dir-missing", lambda d: ["quantize", *CLI_QUANT, "--calib-dir", str(d / "no_images")]),
    ("quantize-eval-dir-missing", lambda d: ["quantize", *CLI_QUANT, "--eval-dir", str(d / "no_images")]),
    ("quantize-weights-missing", lambda d: ["quantize", *CLI_QUANT, "--weights", str(d / "none.safetensors")]),
    ("quantize-weights-garbage", lambda d: ["quantize", *CLI_QUANT, "--weights", str(_garbage(d))]),
    ("quantize-weights-wrong-keys", lambda d: ["quantize", *CLI_QUANT, "--weights", str(_wrong_keys(d))]),
    ("quantize-model-kwargs-not-json", lambda d: ["quantize", *CLI_QUANT, "--model-kwargs", "{width: 4"]),
    ("quantize-model-kwargs-list", lambda d: ["quantize", *CLI_QUANT, "--model-kwargs", "[4]"]),
    ("quantize-model-kwargs-unknown", lambda d: ["quantize", *CLI_QUANT, "--model-kwargs", '{"bogus": 1}',
                                                 "--weights", str(_wrong_keys(d))]),
    ("quantize-option-no-equals", lambda d: ["quantize", *CLI_QUANT, "--option", "iters"]),
    ("quantize-option-unknown", lambda d: ["quantize", *CLI_QUANT, "--option", "bogus=1"]),
    ("quantize-option-seed", lambda d: ["quantize", *CLI_QUANT, "--option", "seed=3"]),
    ("quantize-option-wrong-type", lambda d: ["quantize", *CLI_QUANT, "--method", "mse", "--option", "candidates=2.5"]),
    ("quantize-option-fold-str", lambda d: ["quantize", *CLI_QUANT, "--option", "fold_bn=no"]),
    ("quantize-out-suffix", lambda d: ["quantize", *CLI_QUANT, "--no-eval", "--calib-size", "8",
                                       "--out", str(d / "m.tflite")]),
    ("quantize-out-parent-file", lambda d: ["quantize", *CLI_QUANT, "--no-eval", "--calib-size", "8",
                                            "--out", str(_a_file(d) / "m.lowbit")]),
    ("quantize-out-is-dir", lambda d: ["quantize", *CLI_QUANT, "--no-eval", "--calib-size", "8", "--out", str(d)]),
    ("export-no-out", lambda d: ["export", *CLI_QUANT]),
    ("export-out-suffix", lambda d: ["export", *CLI_QUANT, "--calib-size", "8", "--out", str(d / "m.pb")]),
    ("export-method-unknown", lambda d: ["export", *CLI_QUANT, "--method", "nope", "--out", str(d / "m.lowbit")]),
    ("eval-nothing", lambda d: ["eval"]),
    ("eval-missing-artifact", lambda d: ["eval", str(d / "missing.lowbit")]),
    ("eval-garbage-artifact", lambda d: ["eval", str(_garbage(d))]),
    ("eval-directory", lambda d: ["eval", str(d)]),
    ("eval-onnx-missing", lambda d: ["eval", "--onnx", str(d / "missing.onnx")]),
    ("eval-onnx-garbage", lambda d: ["eval", "--onnx", str(_garbage(d, "g.onnx"))]),
    ("eval-unknown-model", lambda d: ["eval", "--model", "nope"]),
    ("eval-eval-size-0", lambda d: ["eval", "--model", "resnet20", "--eval-size", "0"]),
    ("eval-data-missing", lambda d: ["eval", "--model", "resnet20", "--data", str(d / "no_fmnist")]),
    ("qat-epochs-0", lambda d: ["qat", *CLI_QUANT, "--epochs", "0"]),
    ("qat-epochs-neg", lambda d: ["qat", *CLI_QUANT, "--epochs", "-1"]),
    ("qat-train-size-0", lambda d: ["qat", *CLI_QUANT, "--train-size", "0"]),
    ("qat-batch-size-0", lambda d: ["qat", *CLI_QUANT, "--batch-size", "0"]),
    ("qat-lr-text", lambda d: ["qat", *CLI_QUANT, "--lr", "fast"]),
    ("qat-optimizer", lambda d: ["qat", *CLI_QUANT, "--optimizer", "rmsprop"]),
    ("qat-method-unknown", lambda d: ["qat", *CLI_QUANT, "--method", "nope"]),
    ("qat-method-ptq", lambda d: ["qat", *CLI_QUANT, "--method", "minmax"]),
    ("qat-groups-0", lambda d: ["qat", *CLI_QUANT, "--method", "gdrq", "--groups", "0"]),
    ("qat-max-steps-0", lambda d: ["qat", *CLI_QUANT, "--max-steps", "0"]),
    ("qat-data-missing", lambda d: ["qat", *CLI_QUANT, "--data", str(d / "no_fmnist")]),
    ("train-unknown-model", lambda d: ["train", "nope"]),
    ("train-epochs-0", lambda d: ["train", "resnet20", "--epochs", "0"]),
    ("train-batch-size-0", lambda d: ["train", "resnet20", "--batch-size", "0"]),
    ("train-lr-text", lambda d: ["train", "resnet20", "--lr", "x"]),
    ("train-model-kwargs-not-json", lambda d: ["train", "resnet20", "--model-kwargs", "nope"]),
    ("train-teacher-unknown", lambda d: ["train", "resnet20", "--teacher", "nope"]),
    ("train-data-missing", lambda d: ["train", "resnet20", "--data", str(d / "no_fmnist")]),
]


def _garbage(d: Path, name: str = "garbage.lowbit") -> Path:
    p = d / name
    p.write_bytes(b"\x00garbage" * 64)
    return p


def _wrong_keys(d: Path) -> Path:
    p = d / "wrong_keys.safetensors"
    save_file({"not.a.layer": torch.zeros(2)}, str(p))
    return p


def _a_file(d: Path) -> Path:
    p = d / "a_file"
    p.write_text("x")
    return p


@pytest.mark.parametrize("json_flag", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("argv_fn", [fn for _, fn in CLI_CASES], ids=[name for name, _ in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_error_line(tmp_path, capsys, argv_fn, json_flag):
    argv = argv_fn(tmp_path)
    if json_flag:
        if not argv or argv[0] not in ("methods", "models", "quantize", "export", "eval", "qat", "train"):
            pytest.skip("no subcommand to take --json")
        argv = [*argv, "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    if json_flag:
        obj = json.loads(out)
        assert isinstance(obj, dict) and obj.get("error"), out


def test_matrix_size():
    assert len(API_CASES) + len(CLI_CASES) >= 150
