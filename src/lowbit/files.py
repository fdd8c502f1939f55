"""Crash-safe file writing shared by every artifact, checkpoint and export."""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Callable

from .errors import LowbitFileError

# permission bits carried over from a file that is being replaced (not setuid/setgid/sticky)
_PERMISSIONS = 0o777


def _create_temporary(path: Path) -> tuple[str, int]:
    """A new, empty file with a random name beside ``path``; returns its name and its mode.

    It is created with mode 0666 and O_EXCL, so the kernel applies the umask (and any default ACL of
    the folder) exactly as for ``open(path, "w")``: the mode a new file should get is read from it,
    never by setting the process umask (which would race with other threads creating files).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # astronomically unlikely: draw another name
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Run ``write(tmp_path)`` then rename over ``path``, so no half-written file is ever left.

    Permissions: a file that already exists keeps its permission bits (a 0600 artifact stays
    private); a new one gets what a plain ``open(path, "w")`` would (0666 less the umask). Writers
    may recreate the temporary file themselves (safetensors creates 0600 files), so the mode is set
    again after ``write``. The process umask is never changed. If ``write`` fails, ``path`` is left
    as it was and the temporary file is removed.

    Raises:
        LowbitFileError: when the file cannot be written (a missing or read-only folder, a folder
            in its place, a full disk, ...), naming the path and the system's reason.
    """
    path = Path(path)
    try:
        _write_replacing(path, write)
    except OSError as exc:
        if isinstance(exc, LowbitFileError):
            raise
        reason = exc.strerror or str(exc)
        raise LowbitFileError(f"cannot write {path}: {reason}") from exc


def _write_replacing(path: Path, write: Callable[[str], object]) -> None:
    if path.is_dir():
        raise IsADirectoryError(21, "it is a folder")
    for parent in path.parents:  # mkdir would only say "File exists"
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(20, f"{parent} is a file, not a folder")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temporary(path)
    try:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode) & _PERMISSIONS
        except FileNotFoundError:
            pass
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
