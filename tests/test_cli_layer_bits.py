"""``--layer-bits`` / ``--layer-bits-file`` on quantize, export and qat; their errors as one ``lowbit: error:`` line."""
from __future__ import annotations

import json

import pytest

import lowbit
from lowbit.cli import main
from lowbit.quant.layers import quant_layers
from tests.test_cli import run_json, setup  # noqa: F401  (the fixture: tiny Fashion-MNIST and resnet20 weights)


def widths(path) -> dict[str, tuple]:
    q = lowbit.load(path)
    return {n: (l.weight_quant.bits if l.weight_quant.enabled else None,
                l.input_quant.bits if l.input_quant.enabled else None) for n, l in quant_layers(q)}


def test_flags_and_file_end_to_end(setup, capsys) -> None:  # noqa: F811
    tmp, common = setup
    mapping = tmp / "map.json"
    mapping.write_text(json.dumps({"layers.0.*": 2, "layers.1.*": [3, 8], "layers.2.0.conv1": [8, None],
                                   "fc": 6, "layers.2.2.conv1": [8, 0] * 8}))  # per-channel widths, 0: pruned
    out = tmp / "m.lowbit"
    run_json(capsys, ["export", *common, "--calib-size", "16", "--layer-bits-file", str(mapping),
                      "--layer-bits", "fc=fp", "--layer-bits", "conv1=4,8", "--layer-bits", "*.conv2=5,fp",
                      "--layer-bits", "layers.0.1.conv1=[4,2,0,1]", "--out", str(out)])
    got = widths(out)
    assert got["fc"] == (None, None)  # the flag after the file wins
    assert got["conv1"] == (4, 8)
    assert got["layers.0.0.conv1"] == (2, 4) and got["layers.0.0.conv2"] == (5, None)
    assert got["layers.1.0.conv1"] == (3, 8) and got["layers.1.0.shortcut.0"] == (3, 8)
    assert got["layers.2.0.conv1"] == (8, None) and got["layers.2.1.conv1"] == (4, 4)
    layers = dict(quant_layers(lowbit.load(out)))
    assert got["layers.0.1.conv1"] == (4, 4) and layers["layers.0.1.conv1"].weight_quant.group_bits == (4, 2, 0, 1)
    assert got["layers.2.2.conv1"] == (8, 4) and layers["layers.2.2.conv1"].weight_quant.group_bits == (8, 0) * 8
    assert main(["inspect", str(out), "--json"]) == 0
    totals = json.loads(capsys.readouterr().out)["totals"]
    assert totals["fp_layers"] == 1 and totals["pruned_channels"] == 9
    res = run_json(capsys, ["quantize", *common, "--calib-size", "16", "--no-eval", "--layer-bits", "layers.*=3"])
    assert res["quantized_mb"] < res["fp32_mb"]
    assert res["avg_w_bits"] < 4 and res["fp_layers"] == 0  # body at 3 bits, first/last at 8


def test_qat_flag(setup, capsys) -> None:  # noqa: F811
    tmp, common = setup
    out = tmp / "qat.lowbit"
    run_json(capsys, ["qat", *common, "--epochs", "1", "--train-size", "16", "--calib-size", "16",
                      "--batch-size", "8", "--layer-bits", "layers.0.*=2", "--layer-bits", "fc=fp", "--out", str(out)])
    got = widths(out)
    assert got["layers.0.0.conv1"] == (2, 4) and got["fc"] == (None, None)


@pytest.mark.parametrize("flags,message", [
    (["--layer-bits", "fc"], "--layer-bits 'fc': expected PATTERN=BITS"),
    (["--layer-bits", "fc=x"], "'x' is not a bit width or fp"),
    (["--layer-bits", "fc=0"], "option --layer-bits must be"),
    (["--layer-bits", "fc=4,8,8"], "a value is BITS, fp or W,A"),
    (["--layer-bits", "nothing.*=4"], "pattern 'nothing.*' matches no quantizable layer"),
    (["--option", "layer_bits={}"], "use --layer-bits or --layer-bits-file instead"),
])
def test_errors_are_one_line(setup, capsys, flags, message, monkeypatch) -> None:  # noqa: F811
    tmp, common = setup
    import lowbit.cli as cli

    def no_data(*a, **k):  # every error comes before any image is read
        raise AssertionError("data was read")

    monkeypatch.setattr(cli, "_data", no_data)
    assert main(["quantize", *common, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lowbit: error: ") and message in err[-1], err


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "expected a JSON object"),
    ("{bad", "not JSON"),
    ('{"fc": [4]}', "layer 'fc' has 10 output channels, the per-channel widths give 1"),  # a per-channel list
    ('{"fc": "fp"}', "option layer_bits must be"),
])
def test_bad_map_files(setup, capsys, content, message) -> None:  # noqa: F811
    tmp, common = setup
    bad = tmp / "bad.json"
    bad.write_text(content)
    assert main(["export", *common, "--layer-bits-file", str(bad), "--out", str(tmp / "x.lowbit")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lowbit: error: ") and message in err[-1], err
