"""lowbit.load gives ``load_state_dict`` the model's own state-dict metadata (module versions).

torchvision's MNASNet reads ``version`` from the metadata in its ``_load_from_state_dict`` and
refuses None ("version should be set to 1 or 2 instead of None").
"""
from __future__ import annotations

import torch
from torch import nn

import lowbit
from tests.conftest import randomize_bn


class VersionedNet(nn.Module):
    """A CNN whose state-dict hook needs its version, the way torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def test_reload_passes_module_versions(tmp_path) -> None:
    torch.manual_seed(0)
    fp = randomize_bn(VersionedNet()).eval()
    images = torch.randn(8, 3, 12, 12)
    q = lowbit.quantize(fp, images, w_bits=4, a_bits=4, method="minmax")
    path = lowbit.export(q, tmp_path / "m.lowbit")
    reloaded = lowbit.load(path, model=fp)
    with torch.no_grad():
        assert torch.equal(reloaded(images), q(images))
