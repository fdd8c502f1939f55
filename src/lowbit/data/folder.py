"""Users' own images: a folder of class sub-folders (or a flat folder), read with Pillow."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import LowbitError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_image_folder(root: str | os.PathLike, size: tuple[int, int] = (28, 28), channels: int = 1,
                      mean: Sequence[float] = (0.2860,), std: Sequence[float] = (0.3530,),
                      limit: int | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """Read images under ``root`` into a normalized N x C x H x W tensor.

    Class sub-folders give labels (sorted names -> 0..K-1); a flat folder gets label -1.
    Returns ``(images, labels, class_names)``.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise LowbitError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    entries: list[tuple[Path, int]] = []
    if classes:
        for idx, name in enumerate(classes):
            entries += [(p, idx) for p in sorted((root / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
    else:
        entries = [(p, -1) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
    if not entries:
        raise LowbitError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {root}")
    if limit is not None:
        entries = entries[:limit]
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise LowbitError(f"channels must be 1 or 3, got {channels}")
    if len(mean) != channels or len(std) != channels:
        raise LowbitError("mean and std need one value per channel")
    arrays = []
    for path, _ in entries:
        try:
            with Image.open(path) as img:
                img = img.convert(mode).resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError; truncated files too
            raise LowbitError(f"cannot read image {path}: {exc}") from None
        arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays))
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    y = torch.tensor([label for _, label in entries], dtype=torch.int64)
    return x, y, classes
