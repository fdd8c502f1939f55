"""Block partition of any CNN and the bounded block-input caches."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.graph.surgery import prepare
from lowbit.ptq.blocks import TensorCache, capture_block_io, find_blocks
from lowbit.quant.layers import quant_layers

from ..conftest import calib_tensor, make_model


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "shufflenetv2", "resnet18", "zoofree", "untraceable"])
def test_blocks_cover_every_layer_once_in_execution_order(name: str) -> None:
    model = make_model(name)
    x = calib_tensor(2)
    qmodel, record = prepare(model, QuantConfig(), x)
    blocks = find_blocks(qmodel, x)
    covered = [n for b in blocks for n, _ in b.layers]
    assert sorted(covered) == sorted(n for n, _ in quant_layers(qmodel))
    assert len(covered) == len(set(covered))
    order = record["layer_order"]
    firsts = [order.index(b.layers[0][0]) for b in blocks]
    assert firsts == sorted(firsts)


def test_resnet_blocks_are_residual_blocks() -> None:
    model = make_model("resnet20")
    x = calib_tensor(2)
    qmodel, _ = prepare(model, QuantConfig(), x)
    names = [b.name for b in find_blocks(qmodel, x)]
    assert names[0] == "conv1" and names[-1] == "fc"
    assert len(names) == 2 + 9  # stem, nine basic blocks, head


def test_max_layers_splits_large_blocks() -> None:
    model = make_model("resnet20")
    x = calib_tensor(2)
    qmodel, _ = prepare(model, QuantConfig(), x)
    assert all(len(b.layers) == 1 for b in find_blocks(qmodel, x, max_layers=1))


def test_shared_layer_is_rejected() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.fc = nn.Linear(1, 2)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    x = calib_tensor(2)
    qmodel, _ = prepare(Shared().eval(), QuantConfig(), x)
    with pytest.raises(LowbitError, match="exactly once"):
        find_blocks(qmodel, x)


@pytest.mark.parametrize("limit", [1 << 30, 0])
def test_cache_in_memory_and_on_disk_agree(limit: int) -> None:
    values = torch.randn(10, 3, 4, 4)
    cache = TensorCache(10, (3, 4, 4), limit, torch.device("cpu"))
    assert cache.on_disk == (limit == 0)
    cache.write(0, values[:6])
    cache.write(6, values[6:])
    idx = torch.tensor([7, 2, 2, 9, 0])
    assert torch.equal(cache.get(idx), values[idx])
    path = cache._file
    cache.close()
    if path:
        import os
        assert not os.path.exists(path)


def test_capture_matches_a_direct_forward() -> None:
    model = make_model("resnet20")
    x = calib_tensor(6)
    qmodel, _ = prepare(model, QuantConfig(), x)
    block = find_blocks(qmodel, x)[3]
    seen = {}
    h = block.module.register_forward_hook(lambda m, a, o: seen.update(i=a[0], o=o))
    qmodel(x)
    h.remove()
    ins, outs = capture_block_io(qmodel, block.module, x, 4, 1 << 30, torch.device("cpu"))
    assert torch.allclose(ins.get(torch.arange(6)), seen["i"]) and torch.allclose(outs.get(torch.arange(6)), seen["o"])
