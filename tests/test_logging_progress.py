"""Library messages go to the ``lowbit`` loggers (nothing on stdout); progress bars default to auto (TTY + env)."""
from __future__ import annotations

import io
import logging
import sys

import pytest
import torch

import lowbit
from lowbit import progress
from lowbit.config import QuantConfig

from .conftest import calib_tensor, make_model


class FakeTTY(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def tty(monkeypatch):
    """Makes ``sys.stderr`` a fake terminal when called (in the test body: pytest's capture resets
    ``sys.stderr`` between a fixture's setup and the test's call)."""
    monkeypatch.delenv("LOWBIT_PROGRESS", raising=False)

    def use() -> FakeTTY:
        stream = FakeTTY()
        monkeypatch.setattr(sys, "stderr", stream)
        return stream
    return use


@pytest.fixture
def pipe(monkeypatch):
    """Makes ``sys.stderr`` a plain text stream (not a terminal) when called."""
    monkeypatch.delenv("LOWBIT_PROGRESS", raising=False)

    def use() -> io.StringIO:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        return stream
    return use


def _drain(enable) -> None:
    for _ in progress.progress_bar(range(3), desc="work", enable=enable):
        pass


def test_auto_shows_a_bar_on_a_terminal(tty) -> None:
    tty = tty()
    assert progress.progress_enabled(None)
    _drain(None)
    assert "work" in tty.getvalue()


def test_auto_is_quiet_when_stderr_is_not_a_terminal(pipe) -> None:
    pipe = pipe()
    assert not progress.progress_enabled(None)
    _drain(None)
    assert pipe.getvalue() == ""


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_the_environment_turns_auto_off(tty, monkeypatch, value) -> None:
    tty = tty()
    monkeypatch.setenv("LOWBIT_PROGRESS", value)
    _drain(None)
    assert tty.getvalue() == ""


def test_the_environment_can_force_bars_into_a_log(pipe, monkeypatch) -> None:
    pipe = pipe()
    monkeypatch.setenv("LOWBIT_PROGRESS", "1")
    _drain(None)
    assert "work" in pipe.getvalue()


def test_explicit_true_and_false_win(tty, pipe, monkeypatch) -> None:
    log = pipe()  # not a terminal, yet True shows a bar
    _drain(True)
    assert "work" in log.getvalue()
    tty = tty()
    monkeypatch.setenv("LOWBIT_PROGRESS", "1")
    _drain(False)
    assert tty.getvalue() == ""


def test_a_stream_without_isatty_means_no_bar(monkeypatch) -> None:
    monkeypatch.delenv("LOWBIT_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", None)
    assert not progress.progress_enabled(None)


def test_api_progress_defaults_to_auto(tty) -> None:
    tty = tty()
    assert QuantConfig().progress is None
    q = lowbit.quantize(make_model("resnet20"), calib_tensor(8), 4, 4, method="minmax")
    assert "observing activations" in tty.getvalue()  # the calibration pass showed its bar
    assert q.lowbit_info["config"]["progress"] is None
    with pytest.raises(lowbit.LowbitError, match="progress"):
        lowbit.quantize(make_model("resnet20"), calib_tensor(8), 4, 4, progress="yes")


def test_api_progress_false_stays_quiet_on_a_terminal(tty) -> None:
    tty = tty()
    lowbit.quantize(make_model("resnet20"), calib_tensor(8), 4, 4, method="minmax", progress=False)
    assert tty.getvalue() == ""


def test_the_library_adds_only_a_null_handler() -> None:
    handlers = logging.getLogger("lowbit").handlers
    assert handlers and all(isinstance(h, logging.NullHandler) for h in handlers)


def test_quantize_export_load_log_and_print_nothing(tmp_path, caplog, capsys, pipe) -> None:
    pipe()
    fp = make_model("resnet20")
    with caplog.at_level(logging.DEBUG, logger="lowbit"):
        q = lowbit.quantize(fp, calib_tensor(8), 4, 4, method="minmax")
        path = lowbit.export(q, tmp_path / "m.lowbit")
        lowbit.load(path, model=fp)
    assert capsys.readouterr().out == ""
    by_level = {(r.name, r.levelno, r.getMessage().split(" ")[0]) for r in caplog.records}
    assert ("lowbit.api", logging.INFO, "quantized") in by_level
    assert ("lowbit.api", logging.INFO, "wrote") in by_level
    assert ("lowbit.api", logging.DEBUG, "loaded") in by_level


def test_qat_epoch_lines_go_to_the_log_not_stdout(caplog, capsys, pipe) -> None:
    pipe()
    x, y = calib_tensor(16), torch.arange(16) % 10
    with caplog.at_level(logging.INFO, logger="lowbit"):
        lowbit.qat(make_model("resnet20"), (x, y), method="lsq", epochs=1, batch_size=8)
    assert capsys.readouterr().out == ""
    epoch_lines = [r for r in caplog.records if r.name == "lowbit.qat.engine" and "epoch=1" in r.getMessage()]
    assert epoch_lines and epoch_lines[0].levelno == logging.INFO


def test_a_log_callable_still_receives_the_lines(pipe) -> None:
    pipe()
    lines: list[str] = []
    x, y = calib_tensor(16), torch.arange(16) % 10
    lowbit.qat(make_model("resnet20"), (x, y), method="lsq", epochs=1, batch_size=8, log=lines.append)
    assert any("epoch=1" in line for line in lines)


def test_training_logs_its_epochs(caplog, capsys, pipe) -> None:
    pipe()
    from lowbit.train import TrainConfig, train_model

    model, x, y = make_model("resnet20"), calib_tensor(16), torch.arange(16) % 10
    with caplog.at_level(logging.INFO, logger="lowbit.train"):
        train_model(model, x, y, cfg=TrainConfig(epochs=1, batch_size=8))
    assert capsys.readouterr().out == ""
    assert any(r.name == "lowbit.train" and r.levelno == logging.INFO for r in caplog.records)
