"""Progress bars: on by default when a person watches (stderr is a terminal), quiet otherwise.

``enable=None`` (the library's default everywhere a ``progress`` option exists) means *auto*:
a bar when ``sys.stderr`` is a terminal, unless the environment variable ``LOWBIT_PROGRESS`` is
``0``, ``false``, ``no`` or ``off``; ``LOWBIT_PROGRESS=1`` (``true``, ``yes``, ``on``) forces bars
even without a terminal (e.g. in a CI log). ``True`` and ``False`` always win over both.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")

ENV_VAR = "LOWBIT_PROGRESS"
_OFF = frozenset({"0", "false", "no", "off"})
_ON = frozenset({"1", "true", "yes", "on"})


def progress_enabled(enable: bool | None = None) -> bool:
    """Whether a bar shows: ``enable`` if it is a bool, else the environment, else whether stderr is a TTY."""
    if enable is not None:
        return bool(enable)
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in _OFF:
        return False
    if env in _ON:
        return True
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable[T], desc: str = "", enable: bool | None = None, total: int | None = None):
    """A tqdm bar on stderr; a silent pass-through wrapper when disabled (``enable``: see ``progress_enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not progress_enabled(enable), file=sys.stderr,
                leave=False, dynamic_ncols=True)
