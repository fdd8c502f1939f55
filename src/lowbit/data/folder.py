"""Users' own images: a folder of class sub-folders (or a flat folder), read lazily with Pillow.

``ImageFolder`` is a map-style ``Dataset``: it lists the files when made and opens an image only
when its item is read, so ``lowbit.quantize(model, ImageFolder(...), calib_size=n)`` reads ``n``
images of a folder of any size. Each item goes through the usual transforms:

1. **channels**: the image's own channel count (gray 1, gray + alpha 2, RGB 3, RGBA 4; palette
   images count as RGB / RGBA) unless ``channels`` asks for a conversion. Without ``channels``
   every image must have the same count as the first one read: nothing is converted silently
   (an RGB folder never turns gray behind the caller's back);
2. **size**: ``image_size`` (an int for square images, or ``(height, width)``) by
   ``resize="stretch"`` (resize to exactly that size; the aspect ratio is not kept, as in
   ``torchvision.transforms.Resize((h, w))``) or ``resize="crop"`` (scale the image so that it
   covers the size, then cut the centre: ``Resize(min side) + CenterCrop``). ``image_size=None``
   keeps each image's size, which must then be the same for all images;
3. **to tensor**: ``C x H x W`` float32 in [0, 1] (8-bit images / 255, 16-bit ones / 65535);
4. **normalize**: ``(x - mean) / std`` per channel (one value per channel); no normalization
   when ``mean`` and ``std`` are None.

Class sub-folders give labels (sorted names -> 0..K-1, ``classes``); a flat folder gets label -1.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import LowbitError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
RESIZE_MODES = ("stretch", "crop")
# Pillow mode -> channels of the image as stored; the mode it is converted to for that many channels
_GRAY_MODES = {"1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_MODE_FOR = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_CHANNEL_NAMES = {1: "grayscale", 2: "grayscale + alpha", 3: "RGB", 4: "RGBA"}


def image_channels(img) -> int:
    """How many channels a Pillow image holds as stored (palette images: RGB, or RGBA with transparency)."""
    mode = img.mode
    if mode in _GRAY_MODES:
        return 1
    if mode in ("LA", "La"):
        return 2
    if mode in ("P", "PA"):
        return 4 if mode == "PA" or "transparency" in img.info else 3
    if mode in ("RGBA", "RGBa"):
        return 4
    return 3  # RGB, CMYK, YCbCr, LAB, HSV: read as RGB


def _size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (int(image_size), int(image_size))
    try:
        h, w = (int(v) for v in image_size)  # type: ignore[union-attr]
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)  # type: ignore
    except (TypeError, ValueError):
        ok = False
    if not ok or h < 1 or w < 1:
        raise LowbitError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return h, w


def _stats(values: Sequence[float] | None, name: str) -> Tensor | None:
    if values is None:
        return None
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        t = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError):
        raise LowbitError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise LowbitError(f"{name} must hold finite numbers, one per channel, got {list(values)}")
    if name == "std" and (t <= 0).any():
        raise LowbitError(f"std must be > 0, got {list(values)}")
    return t


class ImageFolder(Dataset):
    """Images under ``root`` as ``(image C x H x W float32, label)`` items, read on access.

    Args:
        root: a folder of class sub-folders (searched recursively), or of images.
        image_size: an int (square) or ``(height, width)``; None keeps the images' own size.
        channels: 1, 2, 3 or 4 to convert every image to that many channels (RGB -> gray is then
            asked for); None: the images' own, which must agree (see the module docstring).
        mean, std: per-channel normalization (one value per channel); None: pixels in [0, 1].
        resize: "stretch" (exact size) or "crop" (cover, then centre crop).

    Attributes:
        files, targets, classes: the image paths (sorted), their labels, the class names.
    """

    def __init__(self, root: str | os.PathLike, image_size: int | Sequence[int] | None = None,
                 channels: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, resize: str = "stretch") -> None:
        root = Path(root)
        if not root.is_dir():
            raise LowbitError(f"image folder {root} does not exist" if not root.exists()
                              else f"image folder {root} is a file, not a folder")
        if channels is not None and (isinstance(channels, bool) or channels not in _MODE_FOR):
            raise LowbitError(f"channels must be 1, 2, 3 or 4 (or None: the images' own), got {channels!r}")
        if resize not in RESIZE_MODES:
            raise LowbitError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.root, self.size, self.channels, self.resize = root, _size(image_size), channels, resize
        self.mean, self.std = _stats(mean, "mean"), _stats(std, "std")
        if (self.mean is None) != (self.std is None):
            raise LowbitError("pass mean and std together (or neither, for pixels in [0, 1])")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise LowbitError(f"mean and std need one value per channel: got {len(self.mean)} and {len(self.std)}")
        if self.mean is not None and channels is not None and len(self.mean) != channels:
            raise LowbitError(f"mean and std need one value per channel: {channels} channel(s), "
                              f"{len(self.mean)} value(s)")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        entries: list[tuple[Path, int]] = []
        if self.classes:
            for idx, name in enumerate(self.classes):
                entries += [(p, idx) for p in sorted((root / name).rglob("*"))
                            if p.suffix.lower() in IMAGE_EXTS and p.is_file()]
        else:
            entries = [(p, -1) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTS and p.is_file()]
        if not entries:
            raise LowbitError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {root}")
        self.files = [p for p, _ in entries]
        self.targets = [label for _, label in entries]
        self._first: tuple[Path, int, tuple[int, int]] | None = None  # (file, channels, size) of the first read

    def __len__(self) -> int:
        return len(self.files)

    def native_channels(self, index: int = 0) -> int:
        """The channel count image ``index`` holds as stored (reads its header only)."""
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as img:
                return image_channels(img)
        except (OSError, ValueError) as exc:
            raise LowbitError(f"cannot read image {path}: {exc}") from None

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as img:
                x = self._transform(img, path)
        except LowbitError:
            raise
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError; truncated files too
            raise LowbitError(f"cannot read image {path}: {exc}") from None
        return x, self.targets[index]

    def _transform(self, img, path: Path) -> Tensor:
        from PIL import Image

        own = image_channels(img)
        channels = self.channels or own
        if self.channels is None:
            if self._first is None:
                self._first = (path, own, (img.height, img.width))
            elif own != self._first[1]:
                first = self._first
                raise LowbitError(f"{path} is {_CHANNEL_NAMES[own]} ({own} channel(s)) but {first[0]} is "
                                  f"{_CHANNEL_NAMES[first[1]]} ({first[1]}): pass channels= (--channels) to "
                                  f"convert all images to one count")
        if self.mean is not None and len(self.mean) != channels:
            raise LowbitError(f"mean and std need one value per channel: the images have {channels} channel(s) "
                              f"({_CHANNEL_NAMES[channels]}), mean and std {len(self.mean)} value(s)")
        wide = channels == 1 and img.mode in _GRAY_MODES - {"1", "L"}  # 16-bit or float gray: keep the precision
        if wide:
            scale = 1.0 if img.mode == "F" else 65535.0
            img = img.convert("F") if img.mode != "F" else img
        else:
            scale = 255.0
            img = img.convert(_MODE_FOR[channels]) if img.mode != _MODE_FOR[channels] else img
        img = self._resized(img, path)
        arr = np.asarray(img, dtype=np.float32) / scale
        x = torch.from_numpy(np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)))
        if self.mean is not None:
            x = (x - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)
        return x

    def _resized(self, img, path: Path):
        from PIL import Image

        if self.size is None:
            first = self._first
            if first is not None and (img.height, img.width) != first[2] and first[0] != path:
                raise LowbitError(f"{path} is {img.height}x{img.width} but {first[0]} is {first[2][0]}x{first[2][1]}: "
                                  f"pass image_size= (--image-size) to resize all images to one size")
            if first is None:
                self._first = (path, image_channels(img), (img.height, img.width))
            return img
        h, w = self.size
        if self.resize == "stretch":
            return img.resize((w, h), Image.BILINEAR) if (img.height, img.width) != (h, w) else img
        scale = max(h / img.height, w / img.width)
        nh, nw = max(h, round(img.height * scale)), max(w, round(img.width * scale))
        if (nh, nw) != (img.height, img.width):
            img = img.resize((nw, nh), Image.BILINEAR)
        top, left = (nh - h) // 2, (nw - w) // 2
        return img.crop((left, top, left + w, top + h))

    def tensors(self, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """``(images N x C x H x W, labels N)`` of the first ``limit`` images (all when None)."""
        n = len(self) if limit is None else min(limit, len(self))
        items = [self[i] for i in range(n)]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


def load_image_folder(root: str | os.PathLike, size: int | tuple[int, int] | None = (28, 28),
                      channels: int | None = None, mean: Sequence[float] | None = (0.2860,),
                      std: Sequence[float] | None = (0.3530,), limit: int | None = None,
                      resize: str = "stretch") -> tuple[Tensor, Tensor, list[str]]:
    """Read the images under ``root`` into one normalized N x C x H x W tensor (see ``ImageFolder``).

    The defaults are the zoo's Fashion-MNIST preprocessing for grayscale images (28 x 28, its mean
    and std); ``channels=None`` keeps the images' own channel count, so RGB images need three
    values of ``mean`` and ``std`` (or ``channels=1`` to convert them to gray on purpose).
    Returns ``(images, labels, class_names)``; ``limit`` reads only the first images.
    """
    folder = ImageFolder(root, image_size=size, channels=channels, mean=mean, std=std, resize=resize)
    x, y = folder.tensors(limit)
    return x, y, folder.classes
