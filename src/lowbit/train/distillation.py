"""Distillation: the loss against a teacher's soft targets, and an ensemble teacher."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LowbitError


def distillation_loss(teacher: nn.Module, weight: float, temperature: float = 1.0,
                      label_smoothing: float = 0.0) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``loss(logits, inputs, labels)``: ``weight`` x KL to ``teacher``'s logits + the rest cross-entropy.

    The KL term is scaled by ``temperature**2`` (Hinton et al.), so its gradients keep their size.
    The teacher runs under ``no_grad`` as it is (pass it in eval mode). With ``weight`` 1 the labels
    are never read.
    """
    if not 0.0 <= weight <= 1.0 or temperature <= 0:
        raise LowbitError("distillation: weight must be in [0, 1] and temperature > 0")

    def loss(logits: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(xb) / temperature, dim=1)
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="batchmean",
                      log_target=True) * temperature ** 2
        if weight >= 1.0:
            return kd
        return weight * kd + (1 - weight) * F.cross_entropy(logits, yb, label_smoothing=label_smoothing)

    return loss


class Ensemble(nn.Module):
    """Averages the softmax outputs of several models; returns log-probabilities (a distillation teacher)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise LowbitError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)

    def forward(self, x: Tensor) -> Tensor:
        logp = torch.stack([m(x).log_softmax(1) for m in self.members])
        return torch.logsumexp(logp, 0) - math.log(len(self.members))  # log of the mean probability
