"""Architectures from an outside model zoo (pytorchcv) through quantize, reload and ONNX export.

Random weights with BN statistics measured on random images (tests/outside_zoo_models.py), 3x32x32
inputs, 8 calibration and 4 evaluation images: each architecture is one test of a few seconds.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("pytorchcv.models.resnet", reason="the outside-zoo sweep needs the pytorchcv package")

import lowbit  # noqa: E402
from tests.deploy.test_onnx import assert_matches_simulation  # noqa: E402
from tests.outside_zoo_models import ARCHS, build, images  # noqa: E402

CALIB, EVAL = images(8, seed=1), images(4, seed=2)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _quantize(fp: nn.Module, bits: int, method: str = "minmax") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "layer stays float" notes on heads; not what is tested here
        return lowbit.quantize(fp, CALIB, w_bits=bits, a_bits=bits, method=method)


def _onnx_parity(q: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript tracer notes on pytorchcv's Python control flow
        lowbit.export(q, path)
    assert_matches_simulation(q, path, EVAL)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_outside_zoo_architecture(name: str, tmp_path: Path) -> None:
    fp = build(name)
    before = _state(fp)
    with torch.no_grad():
        fp_out = fp(EVAL)

    q8 = _quantize(fp, 8)
    after = _state(fp)
    assert before.keys() == after.keys(), "quantize changed the FP model's state dict keys"
    assert all(torch.equal(before[k], after[k]) for k in before), "quantize changed the FP model's tensors"
    assert not fp.training
    with torch.no_grad():
        assert torch.equal(fp(EVAL), fp_out)
        sim8 = q8(EVAL)
    assert torch.isfinite(sim8).all()

    lowbit.export(q8, tmp_path / "m.lowbit")
    reloaded = lowbit.load(tmp_path / "m.lowbit", model=fp)
    with torch.no_grad():
        assert torch.equal(reloaded(EVAL), sim8), "the reloaded artifact computes something else"
    _onnx_parity(q8, tmp_path / "w8a8.onnx")

    q4 = _quantize(fp, 4)
    _onnx_parity(q4, tmp_path / "w4a4.onnx")


@pytest.mark.parametrize("name", sorted(n for n, a in ARCHS.items() if a.small))
def test_outside_zoo_bitsplit(name: str, tmp_path: Path) -> None:
    fp = build(name)
    q = _quantize(fp, 4, method="bitsplit")
    lowbit.export(q, tmp_path / "m.lowbit")
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "m.lowbit", model=fp)(EVAL), q(EVAL))
    _onnx_parity(q, tmp_path / "m.onnx")
