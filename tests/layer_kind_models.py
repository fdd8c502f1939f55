"""Small models with the layer kinds beyond Conv2d / Linear, shared by the layer-kind tests.

A 1-D CNN (Conv1d + BatchNorm1d + ReLU + Linear), a decoder with ConvTranspose2d (strided with
output_padding, grouped, dilated, each followed by BatchNorm2d or ReLU), a net of Conv2d / Linear
subclasses with their own forward, and a net with kinds lowbit leaves in float.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import randomize_bn


class Net1d(nn.Module):
    """Conv1d -> BN1d -> ReLU (x2, one strided and grouped), a dilated Conv1d, a Linear head."""

    def __init__(self, in_chans: int = 2, num_classes: int = 5) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(in_chans, 8, 5, padding=2, bias=False)
        self.b1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, stride=2, padding=1, groups=2)
        self.b2 = nn.BatchNorm1d(8)
        self.c3 = nn.Conv1d(8, 12, 3, dilation=2, padding=2)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.c3(x))
        return self.fc(x.mean(-1))


class Decoder(nn.Module):
    """Strided Conv2d encoder, then ConvTranspose2d: strided with output_padding (+BN), grouped
    (+BN), dilated; a 1x1 Conv2d head giving a per-pixel map (segmentation-like)."""

    def __init__(self, in_chans: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.Conv2d(in_chans, 8, 3, stride=2, padding=1, bias=False)
        self.eb = nn.BatchNorm2d(8)
        self.up1 = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.ub1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, groups=2)
        self.ub2 = nn.BatchNorm2d(6)
        self.up3 = nn.ConvTranspose2d(6, 6, 3, padding=2, dilation=2)
        self.head = nn.Conv2d(6, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.eb(self.enc(x)))
        x = F.relu(self.ub1(self.up1(x)))
        x = F.relu(self.ub2(self.up2(x)))
        x = F.relu(self.up3(x))
        return self.head(x)


class DecoderClassifier(nn.Module):
    """The decoder's map averaged to logits (for APIs that need N x classes outputs, e.g. QAT)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = Decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x).mean((2, 3))


class AddOne(nn.Conv2d):
    """A Conv2d subclass whose forward adds 1 to its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


class Flip(nn.Conv2d):
    """A Conv2d subclass that convolves with the spatially flipped kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.flip(-1, -2), self.bias)


class Renamed(nn.Conv2d):
    """A Conv2d subclass that only renames it."""


class HalfLinear(nn.Linear):
    """A Linear subclass whose forward halves its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * 0.5


class SubclassNet(nn.Module):
    """Subclasses with their own forward (AddOne, Flip, HalfLinear) and a rename (Renamed)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = AddOne(1, 6, 3, padding=1)
        self.ba = nn.BatchNorm2d(6)
        self.b = Flip(6, 6, 3, padding=1, bias=False)
        self.bb = nn.BatchNorm2d(6)
        self.c = Renamed(6, 8, 3, padding=1, bias=False)
        self.bc = nn.BatchNorm2d(8)
        self.fc = HalfLinear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.ba(self.a(x)))
        x = F.relu(self.bb(self.b(x)))
        x = F.relu(self.bc(self.c(x)))
        return self.fc(x.mean((2, 3)))


class PlainTwin(SubclassNet):
    """SubclassNet with every subclass replaced by its plain class (same parameters)."""

    def __init__(self, net: SubclassNet) -> None:
        super().__init__()
        self.load_state_dict(net.state_dict())
        for name, cls in (("a", nn.Conv2d), ("b", nn.Conv2d), ("c", nn.Conv2d), ("fc", nn.Linear)):
            getattr(self, name).__class__ = cls


class FloatKindsNet(nn.Module):
    """A Conv2d and a Linear lowbit quantizes, plus a Conv3d and a ConvTranspose1d it does not."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.v = nn.Conv3d(1, 2, 3, padding=1)
        self.t1 = nn.ConvTranspose1d(4, 4, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c(x))
        z = self.v(y.unsqueeze(1)).mean(1)
        s = self.t1(z.mean(-1))
        return self.fc(torch.cat([y.mean((2, 3)), s.mean(-1)], 1))


def make(cls: type, seed: int = 0, **kwargs) -> nn.Module:
    """A seeded instance with randomized BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(cls(**kwargs), seed=seed + 1).eval()


def signals(n: int = 24, channels: int = 2, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, length, generator=torch.Generator().manual_seed(seed))


def images(n: int = 24, channels: int = 1, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
