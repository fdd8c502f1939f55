"""The artifact stores the layer specs (since version 3); version-2 files (no spec records) and version-3
files (the same layout for uniform and sparse code books) still load to the same model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lowbit
from lowbit import LowbitError
from lowbit.deploy.artifact import CODE_BOOKS_KEY, SPECS_KEY, VERSION, read_artifact
from lowbit.quant.layer_specs import layer_specs
from tests.conftest import calib_tensor, make_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_model("resnet20")
    q = lowbit.quantize(model, calib_tensor(16), w_bits=4, a_bits=4, w_symmetric=False)
    path = lowbit.export(q, tmp_path_factory.mktemp("specs") / "m.lowbit")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    return model, q, path, meta, tensors


def _write(meta: dict, tensors: dict, manifest: dict, path: Path, version: str = VERSION) -> Path:
    save_file(tensors, str(path), metadata={**meta, "version": version, "manifest": json.dumps(manifest)})
    return path


def test_specs_are_stored_and_read_back_exactly(saved) -> None:
    _, q, path, meta, _ = saved
    assert meta["version"] == VERSION
    manifest = json.loads(meta["manifest"])
    books = manifest[CODE_BOOKS_KEY]
    assert len(manifest[SPECS_KEY]) == 2 * len(manifest["layers"]) and len(books) < len(manifest["layers"])
    stored = read_artifact(path)[0][SPECS_KEY]
    assert [stored[s.name] for s in layer_specs(q)] == layer_specs(q)  # every layer's spec, tensors included


def test_version_2_files_still_load(saved, tmp_path) -> None:
    model, q, path, meta, tensors = saved
    manifest = json.loads(meta["manifest"])
    del manifest[CODE_BOOKS_KEY], manifest[SPECS_KEY]  # exactly the version-2 layout
    old = _write(meta, tensors, manifest, tmp_path / "v2.lowbit", version="2")
    x = calib_tensor(8, seed=3)
    with torch.no_grad():
        assert torch.equal(lowbit.load(old, model=model)(x), q(x))
    assert read_artifact(old)[0][SPECS_KEY] == read_artifact(path)[0][SPECS_KEY]  # derived from the rows
    for version in ("3", VERSION):  # a version-3 or later file must hold them
        with pytest.raises(LowbitError, match="'code_books' is missing"):
            lowbit.load(_write(meta, tensors, manifest, tmp_path / "v3.lowbit", version), model=model)


def test_version_3_files_still_load(saved, tmp_path) -> None:
    """Version 4 added multibit code books; a uniform model's file is laid out as version 3 laid it out."""
    model, q, path, meta, tensors = saved
    old = _write(meta, tensors, json.loads(meta["manifest"]), tmp_path / "v3.lowbit", version="3")
    x = calib_tensor(8, seed=3)
    with torch.no_grad():
        assert torch.equal(lowbit.load(old, model=model)(x), q(x))
    assert read_artifact(old)[0][SPECS_KEY] == read_artifact(path)[0][SPECS_KEY]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m[CODE_BOOKS_KEY][0].__setitem__(4, 1 - m[CODE_BOOKS_KEY][0][4]), "does not match its row"),
    (lambda m: m[CODE_BOOKS_KEY][0].__setitem__(1, 3), "code book 0: tensor spec zero_point"),
    (lambda m: m[CODE_BOOKS_KEY][0].__setitem__(0, "sparse"), "code book 0"),
    (lambda m: m[CODE_BOOKS_KEY].append(m[CODE_BOOKS_KEY][0]), "used by no layer"),
    (lambda m: m[SPECS_KEY].__setitem__(0, None), "gives its weight no code book"),
    (lambda m: m[SPECS_KEY].pop(), "two code book indices"),
])
def test_damaged_spec_records_are_refused(saved, tmp_path, edit, message) -> None:
    model, _, _, meta, tensors = saved
    manifest = json.loads(meta["manifest"])
    edit(manifest)
    with pytest.raises(LowbitError, match=message):
        lowbit.load(_write(meta, tensors, manifest, tmp_path / "bad.lowbit"), model=model)
