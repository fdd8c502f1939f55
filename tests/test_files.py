"""Atomic writes leave either the old file or the new one, with ordinary permissions."""
from __future__ import annotations

import os
import stat

import pytest
import torch

import lowbit
from lowbit.files import atomic_write
from tests.conftest import calib_tensor, make_model


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_umask_permissions_not_0600(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        qmodel = lowbit.quantize(make_model("resnet20"), calib_tensor(8), w_bits=4, a_bits=4)
        artifact = lowbit.export(qmodel, tmp_path / "m.lowbit")
        atomic_write(tmp_path / "t.pt", lambda tmp: torch.save({"a": 1}, tmp))
    finally:
        os.umask(old)
    assert _mode(artifact) == 0o644
    assert _mode(tmp_path / "t.pt") == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def broken(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
