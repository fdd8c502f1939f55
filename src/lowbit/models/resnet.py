"""CIFAR-style ResNets sized for small images (28x28 Fashion-MNIST by default)."""
from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity or 1x1-conv shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with a 3x3 stem and no max-pool, as used on CIFAR-sized inputs."""

    def __init__(self, stage_channels: list[int], blocks_per_stage: int, num_classes: int = 10,
                 in_chans: int = 1) -> None:
        super().__init__()
        width = stage_channels[0]
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, ch in enumerate(stage_channels):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(width, ch, stride))
                width = ch
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # residual branches start as identity

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(self.pool(x).flatten(1))


@register_model
def resnet20(num_classes: int = 10, in_chans: int = 1, width: int = 16) -> ResNet:
    """ResNet-20 (3 stages x 3 blocks, 16/32/64 channels at width 16)."""
    return ResNet([width, 2 * width, 4 * width], 3, num_classes, in_chans)


@register_model
def resnet18(num_classes: int = 10, in_chans: int = 1, width: int = 64) -> ResNet:
    """ResNet-18 layout (4 stages x 2 blocks, 64..512 channels at width 64)."""
    return ResNet([width, 2 * width, 4 * width, 8 * width], 2, num_classes, in_chans)
