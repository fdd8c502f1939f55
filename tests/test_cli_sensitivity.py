"""`lowbit sensitivity`: writes report.md, report.json, heatmap.png (and layer_bits.json); bad input is one error line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lowbit.allocate import average_bits
from lowbit.cli import main
from tests.test_cli_errors import _check_error_output, files, isolated  # noqa: F401  (fixtures)


def _s(f, *extra: str) -> list[str]:
    return ["sensitivity", "--model", "resnet20", "--weights", f["weights"], "--model-kwargs", '{"width": 4}',
            "--data", f["data"], "--no-progress", "--calib-size", "8", *extra]


def test_writes_report_heatmap_and_layer_bits(files, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sens"
    code = main(_s(files, "--bits", "2", "8", "--metric", "taylor", "--out", str(out), "--allocate", "3.5",
                   "--json"))
    stdout, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(stdout)
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "heatmap.png", "layer_bits.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "taylor" and report["bits"] == [2, 8] and len(report["scores"]) == 22
    assert "| `layers.0.0.conv1` |" in (out / "report.md").read_text()
    with Image.open(out / "heatmap.png") as img:
        img.verify()
    layer_bits = json.loads((out / "layer_bits.json").read_text())
    assert layer_bits == result["layer_bits"] and set(layer_bits) == set(report["order"])
    assert layer_bits["conv1"] == layer_bits["fc"] == 8
    assert average_bits(layer_bits, report["params"]) <= 3.5


def test_text_output(files, tmp_path, capsys):  # noqa: F811
    assert main(_s(files, "--bits", "2", "--out", str(tmp_path / "o"))) == 0
    stdout = capsys.readouterr().out
    assert "| layer | params | 2 bit |" in stdout and "report.json" in stdout
    assert not (tmp_path / "o" / "layer_bits.json").exists()


CASES = [
    ("bits-zero", lambda f, t: _s(f, "--bits", "0", "--out", t), "--bits", False),
    ("bits-17", lambda f, t: _s(f, "--bits", "2", "17", "--out", t), "--bits", False),
    ("bits-text", lambda f, t: _s(f, "--bits", "two", "--out", t), "--bits", False),
    ("target", lambda f, t: _s(f, "--target", "inputs", "--out", t), "invalid choice", False),
    ("metric", lambda f, t: _s(f, "--metric", "hessian", "--out", t), "invalid choice", False),
    ("granularity-group", lambda f, t: _s(f, "--granularity", "group", "--out", t), "invalid choice", False),
    ("allocate-zero", lambda f, t: _s(f, "--allocate", "0", "--out", t), "must be > 0", False),
    ("allocate-nan", lambda f, t: _s(f, "--allocate", "nan", "--out", t), "--allocate", False),
    ("allocate-activations", lambda f, t: _s(f, "--allocate", "3", "--target", "activations", "--out", t),
     "--allocate needs --target weights", False),
    ("no-out", lambda f, t: _s(f), "--out", False),
    ("out-is-file", lambda f, t: _s(f, "--out", f["plain"]), "not a directory", False),
    ("unknown-model", lambda f, t: ["sensitivity", "--model", "nope", "--data", f["data"], "--out", t], "nope", False),
    ("calib-size-zero", lambda f, t: _s(f, "--calib-size", "0", "--out", t), "--calib-size", False),
    ("budget-below-bits", lambda f, t: _s(f, "--bits", "2", "3", "--allocate", "1", "--out", t), "too small", False),
    # the 8-bit first and last layer leave too little for the rest: found after the measurement
    ("budget-too-small", lambda f, t: _s(f, "--bits", "2", "--allocate", "2", "--out", t), "too small", True),
]


@pytest.mark.parametrize("json_mode", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_invocation_is_one_error_line(case, json_mode, files, capsys, isolated, tmp_path):  # noqa: F811
    _, make_argv, expected, may_read_images = case
    argv = make_argv(files, str(tmp_path / "out")) + (["--json"] if json_mode else [])
    code = main(argv)
    _check_error_output(capsys, code, json_mode, expected)
    if not may_read_images:
        assert isolated == [], "images were read before the arguments were checked"
