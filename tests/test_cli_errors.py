"""Every CLI failure ends as one ``lowbit: error:`` line, exit status 2, no traceback (and JSON with --json).

Each bad invocation must also be refused before any image is read: argument, option, file and
output-path checks come first (that is the point of checking up front: a typo costs a second,
not a calibration or training run).
"""
from __future__ import annotations

import errno
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lowbit
import lowbit.data
import lowbit.train
from lowbit import cli
from lowbit.cli import main
from lowbit.data import fashion_mnist as fm
from tests.data.test_data import make_fake_fmnist


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Good and bad inputs, made once: tiny Fashion-MNIST, weights, broken files, folders."""
    root = tmp_path_factory.mktemp("cli_errors")
    data = root / "fmnist"
    data.mkdir()
    make_fake_fmnist(data, n_test=8, n_train=8)
    torch.manual_seed(0)
    model = lowbit.create_model("resnet20", width=4)
    weights = root / "r20w4.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    wrong_keys = root / "wrong_keys.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, str(wrong_keys))
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(weights.read_bytes()[:200])
    other_record = root / "mislabelled.safetensors"
    other_record.write_bytes(weights.read_bytes())
    other_record.with_suffix(".json").write_text(json.dumps({"name": "mobilenetv2", "kwargs": {}}))
    plain = root / "plain.txt"
    plain.write_text("hello")
    empty = root / "empty"
    empty.mkdir()
    bad_artifact = root / "bad.lowbit"
    bad_artifact.write_bytes(b"\x00" * 64)
    bad_onnx = root / "bad.onnx"
    bad_onnx.write_bytes(b"not an onnx protobuf")
    return {k: str(v) for k, v in dict(root=root, data=data, weights=weights, wrong_keys=wrong_keys,
                                       garbage=garbage, truncated=truncated, other_record=other_record,
                                       plain=plain, empty=empty, bad_artifact=bad_artifact,
                                       bad_onnx=bad_onnx).items()}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path) -> list[tuple]:
    """No system data set, no debug tracebacks, a private LOWBIT_HOME, no training; returns the data loads seen.

    Training is replaced by a guard: no bad ``train`` invocation may get that far (and should one,
    it must not spend minutes or write a checkpoint anywhere).
    """
    def no_training(*args, **kwargs):
        raise AssertionError("training started despite a bad invocation")

    monkeypatch.setattr(lowbit.train, "train_zoo_model", no_training)
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "no-debian-dataset"))
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path / "home"))
    loads: list[tuple] = []
    for name in ("load_fashion_mnist", "load_image_folder"):
        real = getattr(lowbit.data, name)

        def spy(*a, _real=real, _name=name, **k):
            loads.append((_name, a))
            return _real(*a, **k)

        monkeypatch.setattr(lowbit.data, name, spy)
    return loads


def _model(f, *extra: str, data: str | None = "data") -> list[str]:
    """A good tiny model and data (``data``: the key of the data folder in ``f``, None for none)."""
    return ["--model", "resnet20", "--weights", f["weights"], "--model-kwargs", '{"width": 4}',
            *(["--data", f[data]] if data else []), "--no-progress", "--calib-size", "8", *extra]


def _q(f, *extra: str) -> list[str]:
    return ["quantize", *_model(f), *extra]


# (id, argv(files), a piece of the expected message, whether images may be read before the error)
CASES = [
    # usage of the program itself
    ("no-command", lambda f: [], "required: command", False),
    ("unknown-command", lambda f: ["bogus"], "invalid choice", False),
    ("methods-extra-arg", lambda f: ["methods", "extra"], "unrecognized arguments", False),
    ("methods-unknown-flag", lambda f: ["methods", "--bogus"], "unrecognized arguments", False),
    ("models-extra-arg", lambda f: ["models", "--verbose"], "unrecognized arguments", False),
    # quantize: options
    ("option-seed", lambda f: _q(f, "--option", "seed=3"), "use --seed", False),
    ("option-device", lambda f: _q(f, "--option", "device=cpu"), "use --device", False),
    ("option-fold", lambda f: _q(f, "--option", "fold_bn=false"), "use --no-fold", False),
    ("option-calib-size", lambda f: _q(f, "--option", "calib_size=4"), "use --calib-size", False),
    ("option-config", lambda f: _q(f, "--option", "config=1"), "set by the command", False),
    ("option-twice", lambda f: _q(f, "--option", "w_narrow=true", "--option", "w_narrow=false"), "given twice", False),
    ("option-no-equals", lambda f: _q(f, "--option", "p_act"), "NAME=VALUE", False),
    ("option-empty-name", lambda f: _q(f, "--option", "=3"), "option name", False),
    ("option-bad-name", lambda f: _q(f, "--option", "p-act=3"), "option name", False),
    ("option-unknown", lambda f: _q(f, "--option", "no_such_option=1"), "unknown option", False),
    ("option-vs-flag", lambda f: _q(f, "--option", "granularity=tensor", "--granularity", "channel"),
     "both given", False),
    ("groups-wrong-granularity", lambda f: _q(f, "--granularity", "channel", "--groups", "2"),
     "--groups needs --granularity group", False),
    # quantize: numbers
    ("groups-zero", lambda f: _q(f, "--groups", "0"), "positive integer", False),
    ("groups-text", lambda f: _q(f, "--groups", "two"), "expected an integer", False),
    ("eval-size-negative", lambda f: _q(f, "--eval-size", "-3"), "positive integer", False),
    ("eval-size-zero", lambda f: _q(f, "--eval-size", "0"), "positive integer", False),
    ("calib-size-zero", lambda f: _q(f, "--calib-size", "0"), "positive integer", False),
    ("w-bits-zero", lambda f: _q(f, "--w-bits", "0"), "w_bits must be an integer from 1 to 16", False),
    ("w-bits-17", lambda f: _q(f, "--w-bits", "17"), "w_bits must be an integer from 1 to 16", False),
    ("a-bits-zero", lambda f: _q(f, "--a-bits", "0"), "a_bits", False),
    ("a-bits-text", lambda f: _q(f, "--a-bits", "four"), "a_bits", False),
    ("seed-negative", lambda f: _q(f, "--seed", "-1"), "seed must be", False),
    ("method-unknown", lambda f: _q(f, "--method", "nope"), "unknown method 'nope'", False),
    ("granularity-unknown", lambda f: _q(f, "--granularity", "row"), "invalid choice", False),
    ("device-unknown", lambda f: _q(f, "--device", "toaster"), "unknown device", False),
    ("device-missing-gpu", lambda f: _q(f, "--device", "cuda:99"), "cuda:99", False),
    # quantize: weights and model arguments
    ("weights-missing", lambda f: ["quantize", "--model", "resnet20", "--weights", "/nonexistent/w.safetensors",
                                   "--data", f["data"]], "no such file", False),
    ("weights-directory", lambda f: ["quantize", "--model", "resnet20", "--weights", f["empty"], "--data", f["data"]],
     "is a directory", False),
    ("weights-not-safetensors", lambda f: ["quantize", "--model", "resnet20", "--weights", f["garbage"],
                                           "--data", f["data"]], "not a readable safetensors", False),
    ("weights-truncated", lambda f: ["quantize", "--model", "resnet20", "--weights", f["truncated"],
                                     "--model-kwargs", '{"width": 4}', "--data", f["data"]],
     "not a readable safetensors", False),
    ("weights-wrong-keys", lambda f: ["quantize", "--model", "resnet20", "--weights", f["wrong_keys"],
                                      "--data", f["data"]], "missing", False),
    ("weights-wrong-shapes", lambda f: ["quantize", "--model", "resnet20", "--weights", f["weights"],
                                        "--data", f["data"]], "does not fit resnet20", False),
    ("weights-record-other-model", lambda f: ["quantize", "--model", "resnet20", "--weights", f["other_record"],
                                              "--data", f["data"]], "holds a mobilenetv2 checkpoint", False),
    ("model-kwargs-not-json", lambda f: _q(f, "--model-kwargs", "{width: 4}"), "not valid JSON", False),
    ("model-kwargs-list", lambda f: _q(f, "--model-kwargs", "[4]"), "JSON object", False),
    ("model-kwargs-unknown", lambda f: _q(f, "--model-kwargs", '{"depth": 4}'), "cannot build resnet20", False),
    ("model-kwargs-bad-value", lambda f: _q(f, "--model-kwargs", '{"width": -1}'), "cannot build resnet20", False),
    ("model-kwargs-vs-shipped", lambda f: ["quantize", "--model", "resnet20", "--model-kwargs", '{"width": 4}',
                                           "--data", f["data"]], "was trained with model arguments", False),
    ("model-unknown", lambda f: ["quantize", "--model", "resnet99", "--data", f["data"]], "unknown model", False),
    ("model-without-checkpoint", lambda f: ["quantize", "--model", "resnet18", "--data", f["data"]],
     "--weights", False),
    ("model-missing", lambda f: ["quantize", "--data", f["data"]], "required: --model", False),
    # quantize: output paths
    ("out-folder-missing", lambda f: _q(f, "--out", f["root"] + "/no-such-folder/q.lowbit"), "does not exist", False),
    ("out-is-directory", lambda f: _q(f, "--out", f["empty"]), "is a directory", False),
    ("out-unwritable", lambda f: _q(f, "--out", "/proc/q.lowbit"), "cannot write in /proc", False),
    ("out-parent-is-file", lambda f: _q(f, "--out", f["plain"] + "/q.lowbit"), "not a directory", False),
    # quantize: data
    ("data-missing", lambda f: ["quantize", "--model", "resnet20", "--data", "/nonexistent"], "no such directory", False),
    ("data-is-file", lambda f: ["quantize", "--model", "resnet20", "--data", f["plain"]], "is a file", False),
    ("data-empty-folder", lambda f: ["quantize", *_model(f, data="empty")],
     "Fashion-MNIST train split not found", False),
    ("data-not-used", lambda f: _q(f, "--calib-dir", f["data"], "--eval-dir", f["data"]), "--data is not used", False),
    ("eval-size-with-no-eval", lambda f: _q(f, "--no-eval", "--eval-size", "5"), "only when evaluating", False),
    ("eval-dir-with-no-eval", lambda f: _q(f, "--no-eval", "--eval-dir", f["data"]), "only when evaluating", False),
    ("calib-dir-missing", lambda f: _q(f, "--calib-dir", "/nonexistent"), "no such directory", False),
    ("calib-dir-no-images", lambda f: ["quantize", *_model(f, "--no-eval", "--calib-dir", f["empty"], data=None)],
     "no images", True),
    ("quantize-unknown-flag", lambda f: _q(f, "--w_bits", "4"), "unrecognized arguments", False),
    # export
    ("export-no-out", lambda f: ["export", *_model(f)], "required: --out", False),
    ("export-eval-size-without-eval", lambda f: ["export", *_model(f), "--out", f["root"] + "/e.lowbit",
                                                 "--eval-size", "4"], "only when evaluating", False),
    ("export-method-unknown", lambda f: ["export", *_model(f), "--out", f["root"] + "/e.lowbit", "--method", "nope"],
     "unknown method", False),
    ("export-out-directory", lambda f: ["export", *_model(f), "--out", f["root"]], "is a directory", False),
    # eval
    ("eval-nothing", lambda f: ["eval", "--data", f["data"]], "needs an artifact", False),
    ("eval-missing-artifact", lambda f: ["eval", "/nonexistent.lowbit"], "no artifact", False),
    ("eval-bad-artifact", lambda f: ["eval", f["bad_artifact"], "--data", f["data"]], "not a lowbit artifact", False),
    ("eval-two-models", lambda f: ["eval", f["bad_artifact"], "--onnx", f["bad_onnx"]], "one model", False),
    ("eval-onnx-and-model", lambda f: ["eval", f["bad_onnx"], "--model", "resnet20"], "one model", False),
    ("eval-missing-onnx", lambda f: ["eval", "--onnx", "/nonexistent.onnx"], "no ONNX file", False),
    ("eval-bad-onnx", lambda f: ["eval", "--onnx", f["bad_onnx"], "--data", f["data"]], "ONNX Runtime cannot load", False),
    ("eval-onnx-on-cuda", lambda f: ["eval", f["bad_onnx"], "--device", "cuda:99"], "cuda:99", False),
    ("eval-weights-without-model", lambda f: ["eval", f["bad_artifact"], "--weights", f["weights"]],
     "go with --model", False),
    ("eval-eval-size-zero", lambda f: ["eval", "--model", "resnet20", "--eval-size", "0"], "positive integer", False),
    ("eval-model-unknown", lambda f: ["eval", "--model", "resnet99", "--data", f["data"]], "unknown model", False),
    ("eval-data-missing", lambda f: ["eval", "--model", "resnet20", "--data", "/nonexistent"], "no such directory", False),
    ("eval-data-empty", lambda f: ["eval", "--model", "resnet20", "--weights", f["weights"], "--model-kwargs",
                                   '{"width": 4}', "--data", f["empty"]], "Fashion-MNIST test split not found", False),
    # train
    ("train-no-model", lambda f: ["train"], "required: model", False),
    ("train-unknown-model", lambda f: ["train", "resnet99", "--data", f["data"]], "unknown model", False),
    ("train-epochs-zero", lambda f: ["train", "resnet20", "--epochs", "0"], "positive integer", False),
    ("train-batch-size-zero", lambda f: ["train", "resnet20", "--batch-size", "0"], "positive integer", False),
    ("train-lr-zero", lambda f: ["train", "resnet20", "--lr", "0"], "must be > 0", False),
    ("train-lr-nan", lambda f: ["train", "resnet20", "--lr", "nan"], "finite", False),
    ("train-weight-decay-negative", lambda f: ["train", "resnet20", "--weight-decay", "-1"], "must be >= 0", False),
    ("train-eval-size", lambda f: ["train", "resnet20", "--eval-size", "100"], "unrecognized arguments", False),
    ("train-seed-text", lambda f: ["train", "resnet20", "--seed", "abc"], "expected an integer", False),
    ("train-kd-without-teacher", lambda f: ["train", "resnet20", "--kd", "0.5", "--data", f["data"]],
     "need --teacher", False),
    ("train-kd-above-one", lambda f: ["train", "resnet20", "--teacher", "resnet20", "--kd", "2"], "[0, 1]", False),
    ("train-teacher-unknown", lambda f: ["train", "resnet20", "--teacher", "resnet99", "--data", f["data"]],
     "no shipped checkpoint", False),
    ("train-stop-after-without-checkpoint", lambda f: ["train", "resnet20", "--stop-after", "1", "--data", f["data"]],
     "needs --checkpoint", False),
    ("train-swa-too-long", lambda f: ["train", "resnet20", "--epochs", "2", "--swa-epochs", "3", "--data", f["data"]],
     "swa_epochs", False),
    ("train-model-kwargs-not-json", lambda f: ["train", "resnet20", "--model-kwargs", "notjson"], "not valid JSON", False),
    ("train-model-kwargs-unknown", lambda f: ["train", "resnet20", "--model-kwargs", '{"depth": 2}',
                                              "--data", f["data"]], "cannot build resnet20", False),
    ("train-out-suffix", lambda f: ["train", "resnet20", "--out", f["root"] + "/m.pt", "--data", f["data"]],
     ".safetensors", False),
    ("train-out-folder-missing", lambda f: ["train", "resnet20", "--out", f["root"] + "/no-such-folder/m.safetensors",
                                            "--data", f["data"]], "does not exist", False),
    ("train-out-and-update-zoo", lambda f: ["train", "resnet20", "--out", "m.safetensors", "--update-zoo"],
     "not allowed with", False),
    ("train-data-missing", lambda f: ["train", "resnet20", "--data", "/nonexistent"], "no such directory", False),
    ("train-data-empty", lambda f: ["train", "resnet20", "--model-kwargs", '{"width": 4}', "--data", f["empty"]],
     "Fashion-MNIST train split not found", False),
    ("train-resume-other-kwargs", lambda f: ["train", "resnet20", "--resume", "--model-kwargs", '{"width": 4}',
                                             "--data", f["data"]], "--resume", False),
    ("train-resume-without-checkpoint", lambda f: ["train", "resnet18", "--resume", "--data", f["data"]],
     "no trained checkpoint", False),
    # qat
    ("qat-train-size-zero", lambda f: ["qat", *_model(f), "--train-size", "0"], "positive integer", False),
    ("qat-epochs-zero", lambda f: ["qat", *_model(f), "--epochs", "0"], "positive integer", False),
    ("qat-max-steps-without-checkpoint", lambda f: ["qat", *_model(f), "--max-steps", "3"], "needs --checkpoint", False),
    ("qat-resume-without-checkpoint", lambda f: ["qat", *_model(f), "--resume"], "needs --checkpoint", False),
    ("qat-ptq-method", lambda f: ["qat", *_model(f), "--method", "minmax"], "unknown QAT method", False),
    ("qat-optimizer-unknown", lambda f: ["qat", *_model(f), "--optimizer", "rmsprop"], "invalid choice", False),
    ("qat-kd-above-one", lambda f: ["qat", *_model(f), "--kd", "1.5"], "[0, 1]", False),
    ("qat-lr-negative", lambda f: ["qat", *_model(f), "--lr", "-0.1"], "must be > 0", False),
    ("qat-scale-lr-negative", lambda f: ["qat", *_model(f), "--scale-lr", "-1"], "must be >= 0", False),
    ("qat-option-lr", lambda f: ["qat", *_model(f), "--option", "lr=0.1"], "use --lr", False),
    ("qat-option-epochs", lambda f: ["qat", *_model(f), "--option", "epochs=2"], "use --epochs", False),
    ("qat-option-unknown", lambda f: ["qat", *_model(f), "--option", "no_such_option=1"], "unknown option", False),
    ("qat-weights-missing", lambda f: ["qat", "--model", "resnet20", "--weights", "/nonexistent", "--data", f["data"]],
     "no such file", False),
    ("qat-out-unwritable", lambda f: ["qat", *_model(f), "--out", "/proc/q.lowbit"], "cannot write in /proc", False),
]


def _check_error_output(capsys, code: int, json_mode: bool, expected: str = "") -> dict | None:
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    if not json_mode:
        assert out == ""
        return None
    obj = json.loads(out)
    assert isinstance(obj, dict) and obj["error"] == lines[0][len("lowbit: error: "):]
    assert obj["exit_code"] == 2 and obj["type"]
    return obj


@pytest.mark.parametrize("json_mode", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_invocation_is_one_error_line(case, json_mode, files, capsys, isolated) -> None:
    _, make_argv, expected, may_read_images = case
    argv = make_argv(files) + (["--json"] if json_mode else [])
    code = main(argv)
    _check_error_output(capsys, code, json_mode, expected)
    if not may_read_images:
        assert isolated == [], "images were read before the arguments were checked"


def test_there_are_enough_distinct_cases() -> None:
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids) >= 40
    placeholders = defaultdict(lambda: "x")
    commands = {argv[0] for argv in (c[1](placeholders) for c in CASES) if argv}
    assert {"train", "quantize", "eval", "export", "qat", "methods", "models"} <= commands


def test_json_error_types(files, capsys) -> None:
    assert _check_error_output(capsys, main(["bogus", "--json"]), True)["type"] == "UsageError"
    assert _check_error_output(capsys, main(_q(files, "--method", "nope", "--json")), True)["type"] == "LowbitError"


def test_os_error_during_the_run_is_a_user_error(files, capsys, monkeypatch) -> None:
    """A full disk while writing the artifact: errno text and file name, exit 2, no traceback."""
    def full_disk(qmodel, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lowbit, "export", full_disk)
    out = str(Path(files["root"]) / "full.lowbit")
    obj = _check_error_output(capsys, main(_q(files, "--no-eval", "--out", out, "--json")), True,
                              f"{out}: No space left on device")
    assert obj["type"] == "OSError"


def test_internal_error_is_told_apart_and_debuggable(capsys, monkeypatch) -> None:
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_methods", broken)
    assert main(["methods"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    assert err.splitlines() == [f"lowbit: internal error: ZeroDivisionError: division by zero (a bug in lowbit, "
                                f"please report it; rerun with {cli.DEBUG_VAR}=1 for the traceback)"]
    assert main(["methods", "--json"]) == 1
    out, _ = capsys.readouterr()
    assert json.loads(out)["type"] == "InternalError"
    monkeypatch.setenv(cli.DEBUG_VAR, "1")
    assert main(["methods"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and err.rstrip().splitlines()[-1].startswith(
        "lowbit: internal error: ZeroDivisionError")


def test_keyboard_interrupt_is_exit_130_and_one_line(capsys, monkeypatch) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_models", interrupted)
    assert main(["models"]) == 130
    out, err = capsys.readouterr()
    assert err == "lowbit: interrupted\n" and out == ""
    assert main(["models", "--json"]) == 130
    assert json.loads(capsys.readouterr().out) == {"error": "interrupted", "type": "KeyboardInterrupt",
                                                   "exit_code": 130}


def test_help_and_good_runs_still_exit_0(capsys) -> None:
    assert main(["--help"]) == 0
    assert "usage: lowbit" in capsys.readouterr().out
    assert main(["methods", "--json"]) == 0
    assert "methods" in json.loads(capsys.readouterr().out)


def test_data_folder_is_never_swapped_for_another(tmp_path, monkeypatch) -> None:
    """--data / $LOWBIT_FASHION_MNIST naming a folder without the files is an error, not a fall-back."""
    real = tmp_path / "real"
    real.mkdir()
    make_fake_fmnist(real, n_test=3)
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(real))  # a data set that a fall-back would find
    assert len(fm.load_fashion_mnist("test")[0]) == 3  # nothing named: the default location is used
    with pytest.raises(lowbit.LowbitError, match="Fashion-MNIST test split not found in --data.*no such directory"):
        fm.load_fashion_mnist("test", root=tmp_path / "elsewhere")
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "typo"))
    with pytest.raises(lowbit.LowbitError, match="LOWBIT_FASHION_MNIST"):
        fm.load_fashion_mnist("test")
    (tmp_path / "typo").mkdir()
    with pytest.raises(lowbit.LowbitError, match="missing t10k-images-idx3-ubyte.gz, t10k-labels"):
        fm.load_fashion_mnist("test")
