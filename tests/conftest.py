"""Shared fixtures: tiny seeded models (zoo and hand-written), BN randomization, calibration data."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit

# Tiny versions of every zoo model (seconds, not minutes, on one CPU core).
ZOO_SPECS: dict[str, dict] = {
    "resnet20": {"width": 4},
    "resnet18": {"width": 4},
    "mobilenetv2": {"width_mult": 0.25, "last_channel": 64},
    "shufflenetv2": {"width": 0.5},
}
IMAGE_SIZE = 16  # every zoo model ends in adaptive pooling, 16x16 keeps the suite fast

# Options that run every PTQ method in well under a second on the tiny models (one entry per method).
TINY_METHOD_OPTIONS: dict[str, dict] = {
    "minmax": {},
    "mse": {"candidates": 10},
    "aciq": {},
    "aciq-mix": {},
    "kl": {},
    "lapq": {"iters": 1, "loss_images": 4, "p_count": 2, "lp_samples": 1024, "candidates": 10},
    "brecq": {"iters": 3, "batch_size": 4},
    "qdrop": {"iters": 3, "batch_size": 4},
    "distill": {"block_iters": 2, "joint_iters": 2, "batch_size": 4},
    "bitsplit": {"iters": 1, "samples": 256},
}


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0, spread: float = 1.0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine parameters (in place).

    Fresh BN layers have mean 0, var 1, gamma 1, beta 0, which makes folding look exact even
    when it is wrong; ``spread`` widens the per-channel gamma range (log-uniform).
    """
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            n = mod.num_features
            if mod.running_mean is not None:
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
            if mod.weight is not None:
                log_gamma = (torch.rand(n, generator=gen) * 2 - 1) * spread
                sign = torch.where(torch.rand(n, generator=gen) < 0.1, -1.0, 1.0)
                mod.weight.copy_(sign * torch.exp(log_gamma))
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return model


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ZooFreeNet(nn.Module):
    """A CNN that is not in the zoo and exercises the graph features surgery must handle.

    Grouped conv (groups=2), depthwise conv, residual add, torch.chunk, torch.split, torch.cat,
    a channel shuffle, max and average pooling, ReLU6, functional F.relu and a Linear head.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.act6 = nn.ReLU6()
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.grouped_bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(8)
        self.halfconv = nn.Conv2d(4, 4, 1, bias=True)  # conv with its own bias, then BN
        self.halfconv_bn = nn.BatchNorm2d(4)
        self.maxpool = nn.MaxPool2d(2)
        self.left = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.left_bn = nn.BatchNorm2d(6)
        self.right = nn.Conv2d(5, 6, 1, bias=False)
        self.right_bn = nn.BatchNorm2d(6)
        self.avgpool = nn.AvgPool2d(2)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act6(self.stem_bn(self.stem(x)))
        y = F.relu(self.grouped_bn(self.grouped(x)))
        y = self.depthwise_bn(self.depthwise(y))
        x = x + y                                            # residual add
        a, b = x.chunk(2, dim=1)                             # chunk
        b = F.relu(self.halfconv_bn(self.halfconv(b)))
        x = channel_shuffle(torch.cat([a, b], dim=1), 2)     # cat + shuffle
        x = self.maxpool(x)
        p, q = torch.split(x, [3, 5], dim=1)                 # split (uneven)
        x = torch.cat([F.relu(self.left_bn(self.left(p))), self.act6(self.right_bn(self.right(q)))], dim=1)
        x = self.avgpool(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class UntraceableNet(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace it."""

    def __init__(self, in_chans: int = 1, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        if x.sum() > 0:  # a tensor used as a Python bool
            x = x + self.bn2(self.conv2(x))
        else:
            x = x - self.bn2(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(autouse=True)
def _onnx_exporter(request, monkeypatch) -> None:
    """The ONNX exporter behind ``exporter=None`` in this test.

    lowbit's default is torch's ``torch.export``-based exporter, but it costs 5-40 s per model
    on the 2-core test machine against 0.3-1.5 s for the deprecated TorchScript exporter (see
    tests/deploy/test_onnx_exporter.py), which the suite's budget cannot afford for its ~150 ONNX
    exports. Tests marked ``torch_export`` (the exporter's own tests, the layer kinds, adaptive
    pools, one zoo round trip per model, the pytorchcv sweep's small architectures) run the
    default; the others check the QDQ rewrite on the TorchScript exporter's graph.
    ``LOWBIT_TEST_ONNX_EXPORTER=torch.export`` runs every test on the default exporter.
    """
    import os

    from lowbit.deploy import onnx_qdq

    if request.node.get_closest_marker("torch_export") is None:
        monkeypatch.setattr(onnx_qdq, "DEFAULT_EXPORTER", os.environ.get("LOWBIT_TEST_ONNX_EXPORTER", "torchscript"))


def pytest_collection_modifyitems(config, items) -> None:
    """Skip tests marked ``cuda`` on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def make_zoo(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(lowbit.create_model(name, **ZOO_SPECS[name]), seed=seed + 1).eval()


def make_model(name: str, seed: int = 0) -> nn.Module:
    """A seeded tiny model with randomized BN, by zoo name or 'zoofree' / 'untraceable'."""
    if name in ZOO_SPECS:
        return make_zoo(name, seed)
    torch.manual_seed(seed)
    cls = {"zoofree": ZooFreeNet, "untraceable": UntraceableNet}[name]
    return randomize_bn(cls(), seed=seed + 1).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def calib_tensor(n: int = 16, channels: int = 1, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def self_labelled(name: str = "resnet20", n: int = 64, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Training material for QAT tests: a seeded tiny zoo model, ``n`` random images, and the
    model's own predictions as labels (so the quantized model has a reachable target)."""
    fp = make_model(name, seed)
    x = calib_tensor(n, seed=seed + 5)
    with torch.no_grad():
        y = fp(x).argmax(1)
    return fp, x, y


@pytest.fixture
def calib() -> torch.Tensor:
    """16 random normalized 1 x 16 x 16 images."""
    return calib_tensor(16)


@pytest.fixture
def images() -> torch.Tensor:
    """Held-out random images for comparing outputs (not the calibration ones)."""
    return calib_tensor(8, seed=123)


@pytest.fixture(params=sorted(ZOO_SPECS))
def zoo_name(request) -> str:
    return request.param


@pytest.fixture
def zoo_model(zoo_name) -> nn.Module:
    return make_zoo(zoo_name)


@pytest.fixture(params=sorted(ZOO_SPECS) + ["zoofree"])
def any_model(request) -> nn.Module:
    """Every zoo model plus the hand-written one (all fx-traceable)."""
    return make_model(request.param)


@pytest.fixture
def resnet20() -> nn.Module:
    return make_zoo("resnet20")


@pytest.fixture
def zoofree() -> nn.Module:
    return make_model("zoofree")


@pytest.fixture
def untraceable() -> nn.Module:
    return make_model("untraceable")
