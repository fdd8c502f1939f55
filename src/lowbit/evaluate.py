"""Accuracy and timing of (quantized or FP) models."""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 500, device: str | torch.device = "cpu") -> Tensor:
    """Logits of ``model`` on ``images`` (batched, eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in percent."""
    logits = predict(model, images, batch_size, device)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def timed_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500,
                   device: str | torch.device = "cpu") -> tuple[float, float]:
    """``(top-1 %, seconds)`` for one pass over ``images``."""
    start = time.perf_counter()
    acc = accuracy(model, images, labels, batch_size, device)
    return acc, time.perf_counter() - start
