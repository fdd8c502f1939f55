"""Errors raised by the model during calibration reach the caller as they are (issue 14, item 4)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.ptq.common import observe_fp_inputs
from lowbit.quant.layers import quant_layers

from ..conftest import calib_tensor


class Boom(Exception):
    """A distinctive error of the user's model."""


def _calibration_batch(x: object) -> bool:
    """True for real batches of more than two images: not the tracer's proxy, not the 2-image probe."""
    return isinstance(x, torch.Tensor) and x.shape[0] > 2


class FailsLater(nn.Module):
    """Traces and probes normally; raises ``error`` on calibration batches once ``failing`` is set."""

    def __init__(self, error: BaseException, failing: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.error = error
        self.failing = failing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fail = self.failing and _calibration_batch(x)
        x = torch.relu(self.stem(x))
        if fail:  # after the first layer, before the observed ones
            raise self.error
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("method", ["minmax", "mse", "aciq"])
def test_model_error_during_calibration_propagates(method: str) -> None:
    with pytest.raises(Boom, match="distinctive 4711"):
        lowbit.quantize(FailsLater(Boom("distinctive 4711")), calib_tensor(8), 4, 4, method=method)


def test_keyboard_interrupt_during_calibration_propagates() -> None:
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize(FailsLater(KeyboardInterrupt()), calib_tensor(8), 4, 4)


def test_observers_are_detached_after_a_failed_pass() -> None:
    calib = calib_tensor(8)
    cfg = lowbit.QuantConfig()
    q = lowbit.quantize(FailsLater(Boom("late"), failing=False), calib, 4, 4)
    q.failing = True
    with pytest.raises(Boom):
        observe_fp_inputs(q, calib, cfg)
    assert all(layer.input_quant.observer is None for _, layer in quant_layers(q))
    q.failing = False
    assert observe_fp_inputs(q, calib, cfg)  # and calibration works again afterwards


class SkipsLayerLater(nn.Module):
    """Uses ``conv`` when traced and probed only: calibration completes without reaching it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = _calibration_batch(x)
        x = torch.relu(self.stem(x))
        if not skip:
            x = torch.relu(self.conv(x))
        return self.head(x.mean((2, 3)))


def test_a_complete_pass_that_misses_a_layer_still_says_so() -> None:
    with pytest.raises(LowbitError, match="saw no data.*conv"):
        lowbit.quantize(SkipsLayerLater(), calib_tensor(8), 4, 4)
