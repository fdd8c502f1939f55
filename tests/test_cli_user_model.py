"""Users' own models and images through the command line (issue #19: "any model, any data").

A model file of the test's own (an RGB CNN with a factory ``build``), its weights, and a folder
of RGB PNG images of another size than the model's input go through ``lowbit quantize``,
``lowbit eval`` and ``lowbit export --onnx``; every number is checked against the Python API
doing the same by hand. Then each way the user's file can fail, ``package.module:factory``,
``--model-kwargs``, ``torch.save`` weights, channel mismatches, lazy reading and the defaults.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lowbit
from lowbit import cli
from lowbit.cli import main
from lowbit.data import ImageFolder
from lowbit.errors import LowbitError
from lowbit.models.user import ModelSource, build_user_model, load_model, read_weights
from tests.conftest import randomize_bn

MODEL_CODE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small RGB CNN: two convs with BatchNorm, a residual add, global pooling, a classifier."""

    def __init__(self, width=8, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                  nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        x = self.down(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(width=8, num_classes=4):
    return Net(width, num_classes)
'''
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
STATS = ["--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
N_CLASSES, PER_CLASS, SIZE = 4, 4, (40, 52)  # images 40 x 52 (W x H), read at 32 x 32


def _write_images(root: Path, mode: str = "RGB", per_class: int = PER_CLASS, size=SIZE, seed: int = 0) -> Path:
    """Noise images in class sub-folders c0..c3, each class with its own brightness (learnable, not constant)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    for c in range(N_CLASSES):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], channels)).astype(np.int32)
            arr = np.clip(arr // 2 + 40 * c, 0, 255).astype(np.uint8)
            Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict[str, Path]:
    """The model file, its weights (safetensors), and a folder of RGB 40 x 52 images in 4 classes.

    As in tests/test_cli.py, the model's head is re-drawn so that its predictions spread over the
    classes, and each image is filed under the class the FP model predicts for it: FP top-1 is
    100% and a quantized model's top-1 is its agreement with the FP model, a number that moves.
    """
    root = tmp_path_factory.mktemp("user_model")
    (root / "mynet.py").write_text(MODEL_CODE)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(MODEL_CODE, str(root / "mynet.py"), "exec"), namespace)
    model = randomize_bn(namespace["build"](), seed=3).eval()
    staging = _write_images(root / "staging", per_class=5)
    x, _ = _reference_images(staging)
    _spread_predictions(model, x)
    with torch.no_grad():
        predictions = model(x).argmax(1).tolist()
    assert sorted(set(predictions)) == list(range(N_CLASSES)), predictions  # every class folder gets images
    images = root / "images"
    for path, label in zip(sorted(staging.glob("c*/*.png")), predictions):
        (images / f"c{label}").mkdir(parents=True, exist_ok=True)
        path.rename(images / f"c{label}" / f"{path.parent.name}_{path.name}")
    weights = root / "mynet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return {"root": root, "file": root / "mynet.py", "weights": weights, "images": images}


@torch.no_grad()
def _spread_predictions(model: torch.nn.Module, images: torch.Tensor) -> None:
    """A head centred on the images' standardised features (logits of about unit spread per class)."""
    feats = []
    handle = model.fc.register_forward_hook(lambda _m, args, _out: feats.append(args[0]))
    model(images)
    handle.remove()
    f = feats[0]
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(model.fc.weight.shape, generator=gen) / f.std(0).clamp_min(1e-6) / f.shape[1] ** 0.5
    model.fc.weight.copy_(w)
    model.fc.bias.copy_(-(model.fc.weight @ f.mean(0)))


def _reference_images(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The folder read by hand (Pillow bilinear to 32 x 32, / 255, normalized): what the CLI should read."""
    xs, ys = [], []
    for c, sub in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(sub.rglob("*.png")):
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
            xs.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
            ys.append(c)
    x = torch.stack(xs)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.tensor(ys)


def _reference_model(user) -> torch.nn.Module:
    namespace: dict = {}
    exec(compile(MODEL_CODE, "ref", "exec"), namespace)
    fp = namespace["build"]()
    from safetensors.torch import load_file

    fp.load_state_dict(load_file(str(user["weights"])))
    return fp.eval()


def _top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return round(100.0 * (logits.argmax(1) == y).double().mean().item(), 2)


def _json(capsys, argv: list[str]) -> dict:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _error(capsys, argv: list[str]) -> str:
    """The one ``lowbit: error:`` line of a failing command (exit 2, no traceback)."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_quantize_eval_export_own_model_and_images_match_the_python_api(user, tmp_path, capsys) -> None:
    """The "Done when" of #19: file.py:build + weights + RGB folder -> quantize, eval, export --onnx."""
    import onnxruntime as ort

    model = f"{user['file']}:build"
    out, onnx_out = tmp_path / "m.lowbit", tmp_path / "m.onnx"
    res = _json(capsys, ["quantize", "--model", model, "--weights", str(user["weights"]),
                         "--calib-dir", str(user["images"]), "--eval-dir", str(user["images"]),
                         "--image-size", "32", "--channels", "3", *STATS, "--out", str(out), "--no-progress"])
    assert res["method"] == "bitsplit"  # the CLI's default method
    # the Python API doing the same by hand: the same FP model, the same images, the same call
    x, y = _reference_images(user["images"])
    fp = _reference_model(user)
    q = lowbit.quantize(fp, x, w_bits=4, a_bits=4, method="bitsplit", seed=0)
    with torch.no_grad():
        fp_logits, q_logits = fp(x), q(x)
    assert res["eval_images"] == len(x) == N_CLASSES * 5
    assert res["fp_top1"] == _top1(fp_logits, y) == 100.0
    assert res["quant_top1"] == _top1(q_logits, y)
    # the artifact is that model: rebuilt with the user's architecture it predicts exactly the same
    loaded = lowbit.load(out, model=_reference_model(user))
    with torch.no_grad():
        assert torch.equal(loaded(x), q_logits)
    ev = _json(capsys, ["eval", str(out), "--model", model, "--eval-dir", str(user["images"]),
                        "--image-size", "32", *STATS])
    assert ev["top1"] == res["quant_top1"] and ev["images"] == len(x)
    # the image size and channels come from the artifact's recorded input when not given
    assert _json(capsys, ["eval", str(out), "--model", model, "--eval-dir", str(user["images"]), *STATS])["top1"] \
        == ev["top1"]
    exp = _json(capsys, ["export", str(out), "--model", model, "--onnx", str(onnx_out)])
    assert exp["out"] == str(onnx_out) and onnx_out.is_file()
    session = ort.InferenceSession(str(onnx_out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ort_logits = torch.from_numpy(np.concatenate([session.run(None, {name: x[i:i + 1].numpy()})[0]
                                                  for i in range(len(x))]))
    assert torch.equal(ort_logits.argmax(1), q_logits.argmax(1))
    assert torch.allclose(ort_logits, q_logits, atol=0.05 * q_logits.abs().max().item())
    ev_onnx = _json(capsys, ["eval", "--onnx", str(onnx_out), "--eval-dir", str(user["images"]), *STATS])
    assert ev_onnx["top1"] == _top1(ort_logits, y) == res["quant_top1"]


def test_package_module_factory_and_model_kwargs(user, tmp_path, capsys, monkeypatch) -> None:
    pkg = tmp_path / "lowbit_test_pkg_a"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(MODEL_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "k.lowbit"
    _json(capsys, ["export", "--model", "lowbit_test_pkg_a.nets:build", "--model-kwargs", '{"width": 4}',
                   "--calib-dir", str(user["images"]), "--image-size", "16", "--method", "minmax",
                   "--calib-size", "4", "--out", str(out)])
    from lowbit.deploy import read_artifact

    manifest, _ = read_artifact(out)
    assert manifest["layers"]["stem.0"]["weight_shape"] == [4, 3, 3, 3]  # width 4 reached the factory
    assert manifest["arch"] is None  # not a zoo model: rebuilding it needs --model
    assert manifest["input_shape"] == [3, 16, 16]
    # the class itself is a factory too, and a zoo-free artifact asks for --model
    assert _json(capsys, ["inspect", str(out), "--model", "lowbit_test_pkg_a.nets:Net",
                          "--model-kwargs", '{"width": 4}'])["layers"].__len__() == 4
    assert "pass the model it was made from" in _error(capsys, ["eval", str(out), "--eval-dir", str(user["images"])])
    conv = ["export", str(out), "--model", "lowbit_test_pkg_a.nets:build", "--model-kwargs", '{"width": 4}']
    assert "--w-bits: for quantizing a model, not for exporting an artifact" in _error(
        capsys, [*conv, "--onnx", str(tmp_path / "k.onnx"), "--w-bits", "2"])
    assert "--out and --onnx both given" in _error(capsys, [*conv, "--onnx", str(tmp_path / "k.onnx"),
                                                            "--out", str(tmp_path / "k2.onnx")])
    res = _json(capsys, [*conv, "--out", str(tmp_path / "k.onnx"), "--eval", "--eval-dir", str(user["images"])])
    assert res["eval_images"] == 20 and (tmp_path / "k.onnx").is_file()
    msg = _error(capsys, ["quantize", "--model", "lowbit_test_pkg_a.nets:build", "--model-kwargs", '{"depth": 2}',
                          "--calib-dir", str(user["images"]), "--no-eval"])
    assert "cannot call lowbit_test_pkg_a.nets:build with arguments {'depth': 2}" in msg
    assert "no module named 'lowbit_test_no_such_pkg'" in _error(
        capsys, ["quantize", "--model", "lowbit_test_no_such_pkg.nets:build", "--calib-dir", str(user["images"])])


def test_state_dict_weights_from_torch_save(user, tmp_path) -> None:
    ref = _reference_model(user)
    x = torch.randn(2, 3, 16, 16)
    plain, ckpt, ddp, both = (tmp_path / n for n in ("sd.pt", "ckpt.pth", "ddp.pt", "both.pt"))
    torch.save(ref.state_dict(), plain)
    torch.save({"state_dict": ref.state_dict(), "epoch": 3, "best": 0.5}, ckpt)
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, ddp)
    torch.save({"state_dict": ref.state_dict(), "model": ref.state_dict()}, both)
    for weights in (plain, ckpt, ddp, user["weights"]):
        model = load_model(f"{user['file']}:build", weights=weights)
        with torch.no_grad():
            assert torch.equal(model(x), ref(x)), weights
    with pytest.raises(LowbitError, match="both 'state_dict' and 'model'"):
        read_weights(both)
    pickled = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a pickled module: weights_only refuses it, nothing runs
    with pytest.raises(LowbitError, match="not a plain state dict"):
        read_weights(pickled)
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(LowbitError, match="does not fit Net"):
        load_model(f"{user['file']}:build", weights=wrong)


# (name, file contents, expected line of the error or None, a piece of the message)
BROKEN = [
    ("syntax", "import torch\n\ndef build(:\n    pass\n", 3, "SyntaxError"),
    ("import", "import torch\nimport lowbit_test_missing_dependency\n\ndef build():\n    pass\n", 2,
     "ModuleNotFoundError: No module named 'lowbit_test_missing_dependency'"),
    ("raises-at-import", "x = 1\ny = {}['nope']\n", 2, "KeyError"),
    ("factory-raises", "from torch import nn\n\ndef build():\n    width = -1\n    raise ValueError(f'bad width {width}')\n",
     5, "error in {file}:build: ValueError: bad width -1"),
    ("factory-raises-deeper", "from torch import nn\n\ndef helper():\n    return nn.Conv2d(3, -4, 3)\n\n"
                              "def build():\n    return helper()\n", 4, "error in {file}:build"),
    ("sys-exit", "import sys\nsys.exit(2)\n", 2, "called sys.exit(2)"),
    ("not-module", "def build():\n    return [1, 2]\n", None, "{file}:build returned a builtins.list, not a torch.nn.Module"),
    ("no-factory", "def make():\n    pass\n\nclass Other:\n    pass\n", None, "{file} has no 'build'; it defines: Other, make"),
    ("not-callable", "build = 3\n", None, "{file}:build is a int, not a function or class"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_errors_in_the_users_file_name_the_file_and_line(case, user, tmp_path, capsys, monkeypatch) -> None:
    name, code, line, piece = case
    path = tmp_path / f"broken_{name.replace('-', '_')}.py"
    path.write_text(code)
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or (_ for _ in ()).throw(AssertionError))
    msg = _error(capsys, ["quantize", "--model", f"{path}:build", "--calib-dir", str(user["images"]),
                          "--image-size", "32", "--no-eval"])
    assert piece.format(file=path) in msg
    if line is not None:
        assert f"{path}:{line}:" in msg
    assert opened == []  # refused before any image was read
    with pytest.raises(LowbitError):  # the Python-level function raises the same error
        build_user_model(f"{path}:build")
    if name in ("syntax", "import", "raises-at-import", "sys-exit"):  # failed at import: no half-made module left
        assert not [m for m in sys.modules if m.startswith(f"lowbit_user_{path.stem}_")]


def test_model_sources_lowbit_does_not_take(user, tmp_path, capsys) -> None:
    cases = {
        "nope.pt2": "a torch.export program cannot be quantized by lowbit",
        "model.pt": "does not load pickled whole models",
        f"{user['file']}": "name the factory that builds the model, e.g. --model",
        "mynet.Net": "for a factory in a module write mynet:Net",
        f"{tmp_path}/missing.py:build": "no model file",
        f"{user['file']}:": "must name the factory",
    }
    for source, piece in cases.items():
        assert piece in _error(capsys, ["quantize", "--model", source, "--calib-dir", str(user["images"])]), source
    assert ModelSource("resnet20").is_zoo and ModelSource(f"{user['file']}:build").kind == "file"
    assert ModelSource("pkg.mod:Net.small").kind == "module"


def test_channel_mismatch_is_refused_not_converted(user, tmp_path, capsys) -> None:
    gray = _write_images(tmp_path / "gray", mode="L", per_class=1)
    model = ["--model", f"{user['file']}:build", "--weights", str(user["weights"]), "--no-eval"]
    msg = _error(capsys, ["quantize", *model, "--calib-dir", str(gray), "--image-size", "16"])
    assert "grayscale (1 channel(s)" in msg and "takes 3 channel(s): pass --channels 3" in msg
    msg = _error(capsys, ["quantize", *model, "--calib-dir", str(user["images"]), "--channels", "1"])
    assert "--channels 1, but --model" in msg and "takes 3 channel(s)" in msg
    # a zoo model (1 channel) on RGB images: no silent RGB -> gray
    msg = _error(capsys, ["quantize", "--model", "resnet20", "--calib-dir", str(user["images"]), "--no-eval"])
    assert "RGB (3 channel(s)" in msg and "pass --channels 1" in msg
    # an RGB model on Fashion-MNIST (grayscale)
    assert "pass --calib-dir" in _error(capsys, ["quantize", *model])
    assert "one value per channel" in _error(capsys, ["quantize", *model, "--calib-dir", str(user["images"]),
                                                      "--mean", "0.5", "--std", "0.5"])
    # asked for, the conversion happens: gray images as 3 equal channels
    res = _json(capsys, ["quantize", *model, "--calib-dir", str(gray), "--image-size", "16", "--channels", "3",
                         "--method", "minmax"])
    assert res["method"] == "minmax"


def test_calibration_reads_only_calib_size_images(user, capsys, monkeypatch) -> None:
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    folder = ImageFolder(user["images"], image_size=32)
    assert opened == [] and len(folder) == N_CLASSES * 5  # listing opens nothing
    res = _json(capsys, ["quantize", "--model", f"{user['file']}:build", "--weights", str(user["weights"]),
                         "--calib-dir", str(user["images"]), "--image-size", "32", "--calib-size", "3",
                         "--method", "minmax", "--no-eval"])
    assert res["calib_size"] == 3
    # 3 images drawn by the seed, plus one header read to compare the channels with the model
    assert len(opened) <= 4 and len(set(opened)) <= 4, opened


def test_image_folder_sizes_crop_and_consistency(tmp_path) -> None:
    _write_images(tmp_path / "a", per_class=1, size=(40, 20))  # W 40, H 20
    x, y = ImageFolder(tmp_path / "a", image_size=(10, 12)).tensors()
    assert x.shape == (4, 3, 10, 12) and y.tolist() == [0, 1, 2, 3]
    crop, _ = ImageFolder(tmp_path / "a", image_size=10, resize="crop").tensors()
    assert crop.shape == (4, 3, 10, 10)
    # crop: scaled to cover 10 x 10 (20 x 10), the centre 10 columns kept
    with Image.open(tmp_path / "a" / "c0" / "0.png") as img:
        ref = np.asarray(img.convert("RGB").resize((20, 10), Image.BILINEAR), dtype=np.float32)[:, 5:15] / 255
    assert torch.allclose(crop[0], torch.from_numpy(ref.transpose(2, 0, 1).copy()))
    own, _ = ImageFolder(tmp_path / "a").tensors()
    assert own.shape == (4, 3, 20, 40)  # no image_size: the images' own size
    Image.new("RGB", (7, 7)).save(tmp_path / "a" / "c3" / "odd.png")
    with pytest.raises(LowbitError, match="pass image_size="):
        ImageFolder(tmp_path / "a").tensors()
    Image.new("L", (40, 20)).save(tmp_path / "a" / "c3" / "odd.png")
    with pytest.raises(LowbitError, match="pass channels="):
        ImageFolder(tmp_path / "a", image_size=8).tensors()
    assert ImageFolder(tmp_path / "a", image_size=8, channels=1).tensors()[0].shape == (5, 1, 8, 8)
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    Image.new("RGBA", (4, 4), (10, 20, 30, 40)).save(rgba / "x.png")
    assert ImageFolder(rgba)[0][0].shape == (4, 4, 4)
    with pytest.raises(LowbitError, match="one value per channel"):
        ImageFolder(rgba, mean=(0.5,), std=(0.5,))[0]


def test_cli_defaults_method_and_progress(monkeypatch, capsys) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["quantize", "--model", "resnet20"])
    assert args.method == cli.RECOMMENDED_METHOD == "bitsplit"
    assert parser.parse_args(["export", "--model", "resnet20", "--out", "x.lowbit"]).method == "bitsplit"
    assert parser.parse_args(["qat", "--model", "resnet20"]).method == "lsq"
    for argv, tty, expected in ((["--progress"], False, True), (["--no-progress"], True, False),
                                ([], True, True), ([], False, False)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty, raising=False)
        assert cli._progress(parser.parse_args(["quantize", "--model", "resnet20", *argv])) is expected, (argv, tty)
    assert "bitsplit" in parser._subparsers._group_actions[0].choices["quantize"].format_help()  # type: ignore
    # image flags without an image folder would be ignored: refused
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert "apply to image folders" in _error(capsys, ["quantize", "--model", "resnet20", "--image-size", "32"])


def test_torch_save_state_dict_keeps_module_versions(tmp_path) -> None:
    """Modules whose loader reads its version from the state dict's metadata (torchvision's MNASNet) load."""
    (tmp_path / "versioned.py").write_text(textwrap.dedent('''
        from torch import nn

        class Versioned(nn.Module):
            _version = 2

            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
                if local_metadata.get("version") is None:
                    raise ValueError("version should be set to 1 or 2 instead of None")
                super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

        def build():
            return nn.Sequential(Versioned())
    '''))
    source = f"{tmp_path / 'versioned.py'}:build"
    model = build_user_model(source)
    torch.save(model.state_dict(), tmp_path / "v.pt")
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "v_ckpt.pt")
    for name in ("v.pt", "v_ckpt.pt"):
        loaded = load_model(source, weights=tmp_path / name)
        assert torch.equal(loaded[0].conv.weight, model[0].conv.weight)
