"""``atomic_write`` permissions: umask for new files, the old mode for replaced ones, umask untouched."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowbit.files import atomic_write

WRITERS = {
    "torch.save": lambda tmp: torch.save({"a": torch.zeros(2)}, tmp),
    "safetensors": lambda tmp: save_file({"a": torch.zeros(2)}, tmp),  # creates its own 0600 file
    "text": lambda tmp: Path(tmp).write_text("x\n"),
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


UMASKS = (0o022, 0o027, 0o077, 0o002)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_new_file_gets_0666_less_the_umask(tmp_path) -> None:
    # in a child process, so this test never changes the umask of the process running the suite
    script = ("import os, sys, torch; from pathlib import Path; from safetensors.torch import save_file; "
              "from lowbit.files import atomic_write\n"
              f"for mask in {UMASKS!r}:\n"
              "    os.umask(mask); d = Path(sys.argv[1]) / oct(mask)\n"
              "    atomic_write(d / 'a.pt', lambda t: torch.save({'a': 1}, t))\n"
              "    atomic_write(d / 'b.safetensors', lambda t: save_file({'a': torch.zeros(1)}, t))\n"
              "    atomic_write(d / 'sub' / 'c.txt', lambda t: Path(t).write_text('x'))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, timeout=120)
    for umask in UMASKS:
        folder = tmp_path / oct(umask)
        for name in ("a.pt", "b.safetensors", "sub/c.txt"):
            assert _mode(folder / name) == 0o666 & ~umask, (oct(umask), name)
        assert sorted(p.name for p in folder.iterdir()) == ["a.pt", "b.safetensors", "sub"]  # no temporaries


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664], ids=oct)
def test_a_replaced_file_keeps_its_mode(tmp_path, writer: str, mode: int) -> None:
    target = tmp_path / "artifact"
    target.write_bytes(b"old")
    os.chmod(target, mode)
    atomic_write(target, WRITERS[writer])
    assert target.read_bytes() != b"old"
    assert _mode(target) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_the_umask_is_never_touched(tmp_path, monkeypatch) -> None:
    def forbidden(mask: int) -> int:
        raise AssertionError("os.umask called: it changes the umask of every thread for a moment")

    monkeypatch.setattr(os, "umask", forbidden)
    for name, writer in WRITERS.items():
        atomic_write(tmp_path / name, writer)  # new file
        atomic_write(tmp_path / name, writer)  # replaced file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(WRITERS)


def test_a_failed_write_of_a_new_file_leaves_nothing(tmp_path) -> None:
    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.bin", broken)
    assert list(tmp_path.iterdir()) == []
