"""Reading an artifact's flat blobs (``params``, ``codes<b>``, ``planes``) front to back, with length checks."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LowbitError


class BlobReader:
    """Consumes a flat blob front to back; a LowbitError when it runs short or has bytes left over."""

    def __init__(self, blob: Tensor | None, what: str, dtype: torch.dtype) -> None:
        blob = torch.zeros(0, dtype=dtype) if blob is None else blob
        if blob.dtype != dtype or blob.dim() != 1:
            raise LowbitError(f"the artifact's {what} blob must be a 1-D {dtype} tensor, got {blob.dtype} of "
                              f"shape {list(blob.shape)}")
        self.blob, self.pos, self.what = blob, 0, what

    def take(self, n: int) -> Tensor:
        """The next ``n`` values (a copy)."""
        if self.pos + n > self.blob.numel():
            raise LowbitError(f"the artifact's {self.what} blob is too short for its manifest")
        out = self.blob[self.pos:self.pos + n].clone()
        self.pos += n
        return out

    def check_done(self) -> None:
        """Every value was taken."""
        if self.pos != self.blob.numel():
            raise LowbitError(f"the artifact's {self.what} blob is longer than its manifest says")
