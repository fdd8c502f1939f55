"""Progress bars that stay quiet when output is not a terminal or when disabled."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], desc: str = "", enable: bool = True, total: int | None = None):
    """A tqdm bar on stderr; a silent pass-through wrapper when disabled."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enable, file=sys.stderr,
                leave=False, dynamic_ncols=True)
