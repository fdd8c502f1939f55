"""export decides the format by suffix (any case) and refuses unknown ones; load refuses ONNX files clearly."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import LowbitError
from tests.conftest import calib_tensor, make_model


@pytest.fixture(scope="module")
def q():
    return lowbit.quantize(make_model("resnet20"), calib_tensor(8), w_bits=4, a_bits=4)


@pytest.mark.parametrize("name", ["m.tflite", "m.pt", "m.pth", "m.onnx.bak", "m.lowbit2", "m.json", "m.v2"])
def test_unknown_suffixes_are_refused_and_nothing_is_written(q, tmp_path, name) -> None:
    with pytest.raises(LowbitError, match=r"unknown suffix .*\.onnx.*\.lowbit.*no suffix"):
        lowbit.export(q, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, kind", [("m.onnx", "onnx"), ("m.ONNX", "onnx"), ("m.Onnx", "onnx"),
                                        ("m.lowbit", "artifact"), ("m.LOWBIT", "artifact"), ("m", "artifact"),
                                        ("m.safetensors", "artifact"), ("dir.v1/m", "artifact")])
def test_known_suffixes_any_case(name, kind) -> None:
    from lowbit.api import export_format

    assert export_format(name) == kind


def test_upper_case_onnx_writes_onnx(q, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    path = lowbit.export(q, tmp_path / "m.ONNX")
    assert path.name == "m.ONNX" and onnx.load(str(path)).graph.node  # a real ONNX graph, not an artifact
    with pytest.raises(LowbitError, match="is an ONNX file: run it with ONNX Runtime"):
        lowbit.load(path)


@pytest.mark.parametrize("name", ["m.LOWBIT", "m"])
def test_artifact_suffixes_round_trip(q, tmp_path, name) -> None:
    path = lowbit.export(q, tmp_path / name)
    x = calib_tensor(2, seed=4)
    with torch.no_grad():
        assert torch.equal(lowbit.load(path)(x), q(x))


def test_load_of_an_onnx_path_says_what_to_use(tmp_path) -> None:
    with pytest.raises(LowbitError, match="lowbit eval --onnx"):
        lowbit.load(tmp_path / "model.onnx")  # (checked before the file is even looked for)


@pytest.mark.parametrize("path", [3, None, b"m.lowbit", ["m.lowbit"]])
def test_path_types_are_checked(q, path) -> None:
    with pytest.raises(LowbitError, match="path must be a str or os.PathLike"):
        lowbit.export(q, path)
    with pytest.raises(LowbitError, match="path must be a str or os.PathLike"):
        lowbit.load(path)
