"""ShuffleNetV2 for small images: channel split (chunk), concat and channel shuffle."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _branch(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, stride, 1, groups=out_ch, bias=False), nn.BatchNorm2d(out_ch),
        nn.Conv2d(out_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
    )


class ShuffleUnit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = out_ch // 2
        if stride > 1:
            self.left = nn.Sequential(
                nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False), nn.BatchNorm2d(in_ch),
                nn.Conv2d(in_ch, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            )
            self.right = _branch(in_ch, half, stride)
        else:
            self.right = _branch(half, half, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat([left, self.right(right)], dim=1)
        else:
            out = torch.cat([self.left(x), self.right(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, stage_channels: list[int], repeats: list[int], num_classes: int = 10,
                 in_chans: int = 1, last_channel: int = 1024) -> None:
        super().__init__()
        ch = 24
        self.stem = nn.Sequential(nn.Conv2d(in_chans, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch),
                                  nn.ReLU(inplace=True))
        units: list[nn.Module] = []
        for out, n in zip(stage_channels, repeats):
            units.append(ShuffleUnit(ch, out, 2))
            units += [ShuffleUnit(out, out, 1) for _ in range(n - 1)]
            ch = out
        self.stages = nn.Sequential(*units)
        self.head = nn.Sequential(nn.Conv2d(ch, last_channel, 1, bias=False),
                                  nn.BatchNorm2d(last_channel), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last_channel, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


@register_model
def shufflenetv2(num_classes: int = 10, in_chans: int = 1, width: float = 1.0) -> ShuffleNetV2:
    """ShuffleNetV2 (stage channels 116/232/464 at width 1.0)."""
    chans = {0.5: [48, 96, 192], 1.0: [116, 232, 464], 1.5: [176, 352, 704], 2.0: [244, 488, 976]}
    if width not in chans:
        from ..errors import LowbitError
        raise LowbitError(f"shufflenetv2 width must be one of {sorted(chans)}, got {width}")
    return ShuffleNetV2(chans[width], [4, 8, 4], num_classes, in_chans)
