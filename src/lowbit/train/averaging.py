"""Stochastic weight averaging (Izmailov et al. 2018): the mean of a model's weights over the last
epochs, with BatchNorm statistics recomputed for the mean.

The BN step is ``torch.optim.swa_utils.update_bn``. The mean itself is not
``swa_utils.AveragedModel``: that keeps a float32 running mean in a second copy of the model,
while the sums here are float64 tensors per parameter (no copy of buffers or structure) that the
FP training checkpoints (``lowbit-train-2``) store as ``average_sums`` / ``average_count``, so
that a run continued from a checkpoint averages exactly as an uninterrupted one.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn


class WeightAverage:
    """Running mean of a model's parameters; BN statistics of the mean are recomputed, not averaged."""

    def __init__(self, model: nn.Module) -> None:
        self.sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
        self.count = 0

    @torch.no_grad()
    def add(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            self.sums[n] += p.detach().double()
        self.count += 1

    @torch.no_grad()
    def load_into(self, model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> None:
        """Copy the mean into ``model`` and re-estimate its BN running statistics on ``x`` (no augmentation)."""
        if self.count == 0:
            return
        for n, p in model.named_parameters():
            p.copy_((self.sums[n] / self.count).to(p.dtype))
        # the whole model in training mode for the pass, BN momentum None (a cumulative average)
        update_bn((x[i:i + batch_size] for i in range(0, len(x), batch_size)), model, device)
        model.eval()
