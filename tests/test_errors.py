"""Every user error surfaces as a LowbitError whose message names the problem."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lowbit
from lowbit import LowbitError
from tests.conftest import calib_tensor, make_zoo


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_zoo("resnet20")


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return calib_tensor(8)


def test_lowbit_error_is_a_value_error():
    assert issubclass(LowbitError, ValueError)


@pytest.mark.parametrize("bits", [0, 17, 2.5, -1, True, "4"])
def test_bad_w_bits(model, x, bits):
    with pytest.raises(LowbitError, match=r"w_bits must be an integer from 1 to 16"):
        lowbit.quantize(model, x, w_bits=bits)


@pytest.mark.parametrize("bits", [0, 17, 3.0])
def test_bad_a_bits(model, x, bits):
    with pytest.raises(LowbitError, match=r"a_bits must be an integer from 1 to 16"):
        lowbit.quantize(model, x, a_bits=bits)


def test_bad_first_last_bits(model, x):
    with pytest.raises(LowbitError, match="first_last_bits"):
        lowbit.quantize(model, x, first_last_bits=0)


@pytest.mark.parametrize("calib, pattern", [
    (torch.randn(8, 16, 16), r"4-D"),                               # 3-D tensor
    (torch.randn(2, 8, 1, 16, 16), r"4-D"),                         # 5-D tensor
    (torch.randn(4), r"4-D"),
    (torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8), r"floating point"),
    (torch.randint(0, 255, (8, 1, 16, 16)), r"floating point"),
    (torch.empty(0, 1, 16, 16), r"empty"),
    ([], r"empty"),
    (iter([]), r"empty"),
    (DataLoader(TensorDataset(torch.empty(0, 1, 16, 16)), batch_size=4), r"empty"),
    ([torch.randn(4, 1, 16, 16), torch.randn(4, 1, 12, 12)], r"differ in shape"),
    ([(torch.randn(4, 1, 16, 16), torch.zeros(4))] * 2 + [("not", "tensor")], r"must hold tensors"),
    (42, r"tensor N x C x H x W or an iterable"),
    ([[1.0, 2.0]], r"must hold tensors"),
], ids=["3d", "5d", "1d", "uint8", "int64", "empty-tensor", "empty-list", "empty-iter", "empty-loader",
        "mixed-shapes", "non-tensor-batch", "number", "nested-floats"])
def test_bad_calibration_data(model, calib, pattern):
    with pytest.raises(LowbitError, match=pattern):
        lowbit.quantize(model, calib)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_calibration_data(model, value):
    calib = calib_tensor(8)
    calib[3, 0, 5, 7] = value
    with pytest.raises(LowbitError, match="NaN or infinite"):
        lowbit.quantize(model, calib)
    with pytest.raises(LowbitError, match="NaN or infinite"):
        lowbit.quantize(model, [(calib, torch.zeros(8))])


def test_calibration_with_wrong_channel_count(model):
    with pytest.raises(LowbitError, match=r"calibration data of shape \(3, 16, 16\) does not fit the model"):
        lowbit.quantize(model, torch.randn(4, 3, 16, 16))


def test_model_without_conv_or_linear(x):
    for bad in (nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Identity()):
        with pytest.raises(LowbitError, match="no Conv2d or Linear"):
            lowbit.quantize(bad, x)


def test_not_a_module(x):
    with pytest.raises(LowbitError, match="torch.nn.Module"):
        lowbit.quantize(lambda t: t, x)


@pytest.mark.parametrize("name", ["nonexistent", "MinMax", "", None])
def test_unknown_method(model, x, name):
    with pytest.raises(LowbitError, match="unknown method") as info:
        lowbit.quantize(model, x, method=name)
    assert "minmax" in str(info.value) and "mse" in str(info.value) and "aciq" in str(info.value)


@pytest.mark.parametrize("method, option", [("minmax", "bogus"), ("mse", "granularty"), ("aciq", "p_weight")])
def test_unknown_option(model, x, method, option):
    with pytest.raises(LowbitError, match=rf"unknown option\(s\) \['{option}'\] for method '{method}'"):
        lowbit.quantize(model, x, method=method, **{option: 1})


@pytest.mark.parametrize("options, pattern", [
    ({"granularity": "row"}, "granularity must be one of"),
    ({"granularity": "group"}, "needs groups >= 1"),
    ({"granularity": "group", "groups": 0}, "needs groups >= 1"),
    ({"calib_size": 0}, "calib_size"),
    ({"batch_size": -1}, "batch_size"),
    ({"method": "mse", "shrink": 1.5}, "shrink"),
    ({"method": "aciq", "dist": "cauchy"}, "laplace"),
    ({"config": {"w_bits": 2}}, "QuantConfig"),
    ({"device": "tpu:7"}, "device"),
])
def test_bad_option_values(model, x, options, pattern):
    with pytest.raises(LowbitError, match=pattern):
        lowbit.quantize(model, x, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(model, x, tmp_path):
    with pytest.raises(LowbitError, match="CUDA is not available"):
        lowbit.quantize(model, x, device="cuda")
    with pytest.raises(LowbitError, match="CUDA is not available"):
        lowbit.quantize(model, x, device="cuda:1")
    q = lowbit.quantize(model, x)
    path = lowbit.export(q, tmp_path / "m.safetensors")
    with pytest.raises(LowbitError, match="CUDA is not available"):
        lowbit.load(path, device="cuda")


# ---------------------------------------------------------------- load / export

def test_load_random_bytes(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(LowbitError, match="not a lowbit artifact"):
        lowbit.load(path, model=make_zoo("resnet20"))


def test_load_empty_and_truncated_files(tmp_path, model, x):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(LowbitError, match="not a lowbit artifact"):
        lowbit.load(empty, model=model)
    good = lowbit.export(lowbit.quantize(model, x), tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LowbitError, match="not a lowbit artifact"):
        lowbit.load(cut, model=model)


def test_load_plain_safetensors_without_format_tag(tmp_path, model):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(LowbitError, match="format tag None"):
        lowbit.load(path, model=model)
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="format tag 'pt'"):
        lowbit.load(path, model=model)


def test_load_wrong_version(tmp_path, model):
    path = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "lowbit-artifact", "version": "99"})
    with pytest.raises(LowbitError, match="version '99' is not supported"):
        lowbit.load(path, model=model)


def test_load_missing_file(tmp_path):
    with pytest.raises(LowbitError, match="no artifact at"):
        lowbit.load(tmp_path / "nope.safetensors")


def test_load_into_wrong_architecture(tmp_path, model, x):
    path = lowbit.export(lowbit.quantize(model, x), tmp_path / "r20.safetensors")
    with pytest.raises(LowbitError, match="shape or groups differ"):
        lowbit.load(path, model=lowbit.create_model("resnet20", width=8))
    with pytest.raises(LowbitError, match="FP architecture"):
        lowbit.load(path, model=nn.Sequential(nn.ReLU()))


def test_load_into_architecture_with_other_layer_names(tmp_path, model, x):
    path = lowbit.export(lowbit.quantize(model, x), tmp_path / "r20.safetensors")
    with pytest.raises(LowbitError, match="layers do not match"):
        lowbit.load(path, model=make_zoo("resnet18"))


def test_load_non_zoo_artifact_needs_model(tmp_path, x):
    from tests.conftest import make_model

    path = lowbit.export(lowbit.quantize(make_model("zoofree"), x), tmp_path / "z.safetensors")
    with pytest.raises(LowbitError, match="pass model="):
        lowbit.load(path)


def test_export_of_unquantized_model(tmp_path, model):
    for bad in (model, nn.Linear(3, 2), "not a model"):
        with pytest.raises(LowbitError, match="never quantized"):
            lowbit.export(bad, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert list(tmp_path.iterdir()) == []


def test_unknown_zoo_model():
    with pytest.raises(LowbitError, match="unknown model 'resnet9000'"):
        lowbit.create_model("resnet9000")
    with pytest.raises(LowbitError, match="width must be one of"):
        lowbit.create_model("shufflenetv2", width=0.7)
