"""Re-estimating BatchNorm running statistics on given inputs."""
from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> int:
    """Recompute the running statistics of every BatchNorm in ``model`` on ``x``; returns their count.

    The statistics are the cumulative average over all batches. Only the BatchNorm layers switch to
    training mode (dropout and the rest keep what they had) and they end in eval mode.
    ``torch.optim.swa_utils.update_bn`` is not used here: it puts the whole model in training mode
    for the pass, which would change what dropout, and the quantizers of a quantized model (Bit-Split
    calls this on one), do while the statistics are taken.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size].to(device))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        bn.eval()
    return len(bns)
