"""Calibration data: validation of what users pass and deterministic sampling."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..errors import LowbitError


def sample_calibration(images: Tensor, n: int, seed: int = 0) -> Tensor:
    """Pick ``n`` images without replacement, the same ones for the same seed."""
    if n > len(images):
        raise LowbitError(f"asked for {n} calibration images but only {len(images)} are available")
    gen = torch.Generator().manual_seed(seed)
    return images[torch.randperm(len(images), generator=gen)[:n]]


def as_calibration_tensor(calib: Tensor | Iterable, limit: int | None = None, ranks: tuple[int, ...] = (4,)) -> Tensor:
    """Turn a tensor or an iterable of batches (tensors or (input, label) pairs) into one tensor.

    ``ranks``: the accepted numbers of dimensions, batch included (4: N x C x H x W images; a
    model with Conv1d layers also takes 3: N x C x L). Raises LowbitError for empty,
    non-floating, wrongly shaped or non-finite data.
    """
    if isinstance(calib, Tensor):
        batches = [calib]
    else:
        try:
            iterator = iter(calib)
        except TypeError:
            raise LowbitError(
                f"calibration data must be a tensor N x C x H x W or an iterable of batches, "
                f"got {type(calib).__name__}") from None
        batches, total = [], 0
        for item in iterator:
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, Tensor):
                raise LowbitError(f"calibration batches must hold tensors, got {type(x).__name__}")
            if x.dim() == min(ranks) - 1:  # a single image
                x = x.unsqueeze(0)
            batches.append(x)
            total += len(x)
            if limit is not None and total >= limit:
                break
        if not batches:
            raise LowbitError("calibration data is empty")
        shapes = {tuple(b.shape[1:]) for b in batches}
        if len(shapes) > 1:
            raise LowbitError(f"calibration batches differ in shape: {sorted(shapes)}")
    for b in batches:
        if b.dim() not in ranks:
            wanted = " or ".join({3: "3-D (N x C x L)", 4: "4-D (N x C x H x W)"}.get(r, f"{r}-D") for r in ranks)
            raise LowbitError(f"calibration data must be {wanted}, got shape {tuple(b.shape)}")
        if not b.is_floating_point():
            raise LowbitError(f"calibration data must be floating point (normalized images), got {b.dtype}")
    x = torch.cat([b.detach().float().cpu() for b in batches]) if len(batches) > 1 else batches[0].detach().float()
    if x.numel() == 0 or len(x) == 0:
        raise LowbitError("calibration data is empty")
    if not torch.isfinite(x).all():
        raise LowbitError("calibration data contains NaN or infinite values")
    return x[:limit] if limit is not None else x
