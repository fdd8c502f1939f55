"""Fashion-MNIST from gzipped IDX files (Debian's ``dataset-fashion-mnist`` by default)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import LowbitError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "LOWBIT_FASHION_MNIST"
MEAN, STD = 0.2860, 0.3530
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise LowbitError(f"{path} is not an IDX file")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(data[2])
    if dtype is None:
        raise LowbitError(f"{path}: unknown IDX element type {data[2]:#x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) - 4 - 4 * ndim < expected:
        raise LowbitError(f"{path} is truncated: header says {shape}, file holds fewer bytes")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim, count=int(np.prod(shape))).reshape(shape)


def find_root(root: str | os.PathLike | None = None, split: str = "test") -> Path:
    """Locate the folder holding ``split``: argument, else $LOWBIT_FASHION_MNIST, else Debian's path.

    A folder the caller names (``root``, or the environment variable when there is no ``root``) is
    the only one looked at: when it lacks the files this is an error, never a silent fall-back to
    another copy of the data set (which would evaluate on data the caller did not choose).
    """
    files = _FILES[split]
    if root is not None and str(root) != "":
        source, where = Path(root), f"--data / root {str(root)!r}"
    elif os.environ.get(ENV_VAR):
        source, where = Path(os.environ[ENV_VAR]), f"${ENV_VAR}={os.environ[ENV_VAR]!r}"
    else:
        source, where = Path(DEBIAN_DIR), None
    if all((source / f).is_file() for f in files):
        return source
    if where is None:
        raise LowbitError(
            f"Fashion-MNIST not found ({split} split): install Debian's package (apt-get install "
            f"dataset-fashion-mnist), or point ${ENV_VAR} / --data at a folder holding {' and '.join(files)}")
    missing = [f for f in files if not (source / f).is_file()]
    why = f"missing {', '.join(missing)}" if source.is_dir() else "no such directory"
    raise LowbitError(f"Fashion-MNIST {split} split not found in {where}: {why}")


def load_fashion_mnist(split: str = "test", root: str | os.PathLike | None = None,
                       normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Return ``(images N x 1 x 28 x 28 float32, labels N int64)`` for ``split`` in train/test."""
    if split not in _FILES:
        raise LowbitError(f"split must be 'train' or 'test', got {split!r}")
    base = find_root(root, split)
    images = read_idx(base / _FILES[split][0])
    labels = read_idx(base / _FILES[split][1])
    if len(images) != len(labels) or images.ndim != 3:
        raise LowbitError(f"Fashion-MNIST {split}: {len(images)} images of shape {images.shape[1:]} "
                          f"but {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - MEAN) / STD
    return x, torch.from_numpy(labels.astype(np.int64))
