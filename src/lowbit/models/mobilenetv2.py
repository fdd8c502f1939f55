"""MobileNetV2 for small images: stride-1 stem, three downsamplings (28 -> 14 -> 7 -> 4)."""
from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


def _divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear), residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_relu6(in_ch, hidden, 1, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride): stride-1 stem, then 28 -> 14 -> 7 -> 4, which keeps
    # CPU training affordable (depthwise convs dominate) while staying accurate on 28x28 inputs
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 1), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width_mult: float = 1.0,
                 last_channel: int = 1280, dropout: float = 0.1) -> None:
        super().__init__()
        ch = _divisible(32 * width_mult)
        features: list[nn.Module] = [conv_bn_relu6(in_chans, ch, 3, 1)]
        for t, c, n, s in self.SETTINGS:
            out = _divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(ch, out, s if i == 0 else 1, t))
                ch = out
        last = _divisible(last_channel * max(1.0, width_mult))
        features.append(conv_bn_relu6(ch, last, 1, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


@register_model
def mobilenetv2(num_classes: int = 10, in_chans: int = 1, width_mult: float = 1.0,
                last_channel: int = 1280) -> MobileNetV2:
    """MobileNetV2 with a stride-1 stem for 28x28 or 32x32 inputs."""
    return MobileNetV2(num_classes, in_chans, width_mult, last_channel)
