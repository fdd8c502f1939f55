"""apply_fold_structure checks each pair first: a conv-like or linear layer and a BatchNorm of its width."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import LowbitError
from lowbit.graph.fold import apply_fold_structure


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False),
                         nn.BatchNorm2d(4), nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3))


@pytest.mark.parametrize("pairs, message", [
    ([("0", "2")], r"'2' is a ReLU, not a BatchNorm"),  # the ReLU would silently become Identity
    ([("2", "1")], r"'2' is a ReLU, not a conv or linear layer"),
    ([("0", "6")], "the BatchNorm has 3 channels, the layer 4"),
    ([("0", "3")], "'3' is a Conv2d, not a BatchNorm"),
    ([("0", "nope")], "the model has no module 'nope'"),
    ([("0", "1"), ("3", "1")], "a module folds into one other module only"),
    ([("0", "1"), ("0", "4")], "a module folds into one other module only"),
], ids=["bn-is-relu", "conv-is-relu", "channels", "bn-is-conv", "missing", "bn-twice", "conv-twice"])
def test_bad_pairs_are_refused_and_nothing_changes(pairs, message) -> None:
    model = net()
    before = [type(m) for m in model]
    with pytest.raises(LowbitError, match=message):
        apply_fold_structure(model, pairs)
    assert [type(m) for m in model] == before and model[0].bias is None and model[3].bias is None


def test_conv_linear_and_transposed_conv_pairs_fold() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 3, bias=False),
                          nn.BatchNorm1d(3), nn.ConvTranspose2d(3, 5, 2, bias=False), nn.BatchNorm2d(5))
    apply_fold_structure(model, [("0", "1"), ("2", "3"), ("4", "5")])
    assert all(isinstance(model[i], nn.Identity) for i in (1, 3, 5))
    assert [model[i].bias.shape for i in (0, 2, 4)] == [torch.Size([4]), torch.Size([3]), torch.Size([5])]
