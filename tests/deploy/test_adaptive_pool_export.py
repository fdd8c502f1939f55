"""Adaptive pooling to a size that does not divide its input exports to ONNX (AlexNet/VGG heads)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.deploy.onnx_qdq import fix_adaptive_pools
from tests.conftest import randomize_bn
from tests.deploy.test_onnx import assert_matches_simulation

pytestmark = pytest.mark.torch_export  # lowbit's default ONNX exporter (tests/conftest.py)


class PooledHead(nn.Module):
    """conv features -> adaptive pool to ``out`` -> flatten -> linear, like torchvision's AlexNet/VGG."""

    def __init__(self, pool: nn.Module, cells: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.pool = pool
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * cells, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


@pytest.mark.parametrize("pool, cells", [(nn.AdaptiveAvgPool2d((3, 3)), 9), (nn.AdaptiveAvgPool2d((5, None)), 5 * 10),
                                         (nn.AdaptiveMaxPool2d(3), 9), (nn.AdaptiveAvgPool2d(4), 16)])
def test_adaptive_pool_exports_at_the_recorded_size(pool: nn.Module, cells: int, tmp_path, monkeypatch) -> None:
    if cells == 50:
        # a None size is resolved by fix_adaptive_pools before either exporter runs; its 50 cells cost
        # 12 s on torch.export (one Slice + ReduceMean each) against 1 s on the TorchScript exporter
        from lowbit.deploy import onnx_qdq
        monkeypatch.setattr(onnx_qdq, "DEFAULT_EXPORTER", "torchscript")
    torch.manual_seed(0)
    model = randomize_bn(PooledHead(pool, cells)).eval()
    calib, images = torch.randn(16, 3, 10, 10), torch.randn(8, 3, 10, 10)
    q = lowbit.quantize(model, calib, w_bits=8, a_bits=8, method="minmax")
    path = lowbit.export(q, tmp_path / "m.onnx")  # input_shape recorded at calibration: 3x10x10
    assert_matches_simulation(q, path, images)


@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d((3, 4)), nn.AdaptiveMaxPool2d((4, 3)), nn.AdaptiveAvgPool2d(1)])
@pytest.mark.parametrize("size", [(7, 10), (9, 9), (12, 12)])
def test_fixed_pool_computes_what_pytorch_does(pool: nn.Module, size: tuple[int, int]) -> None:
    model = nn.Sequential(nn.Identity(), pool)
    x = torch.randn(2, 3, *size)
    expected = model(x)
    fix_adaptive_pools(model, x)
    assert torch.allclose(model(x), expected, rtol=0, atol=1e-6)


def test_pool_called_at_two_sizes_is_left_alone() -> None:
    pool = nn.AdaptiveAvgPool2d(3)
    model = nn.Sequential(pool, nn.Upsample(size=(10, 10)), pool)  # 7x7 -> 3x3 -> 10x10 -> 3x3
    x = torch.randn(1, 2, 7, 7)
    expected = model(x)
    assert fix_adaptive_pools(model, x) == 0
    assert torch.equal(model(x), expected)
