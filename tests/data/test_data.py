"""Datasets: IDX reader, Fashion-MNIST loader, image folders, calibration sampling."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit import LowbitError
from lowbit.data import as_calibration_tensor, load_fashion_mnist, load_image_folder, sample_calibration
from lowbit.data import fashion_mnist as fm
from lowbit.data.fashion_mnist import read_idx

IDX_TYPES = {np.uint8: 0x08, np.int8: 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def write_idx(path, array: np.ndarray, dtype=np.uint8, compress: bool = True) -> None:
    arr = np.asarray(array).astype(dtype)
    header = bytes([0, 0, IDX_TYPES[dtype], arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_types_and_shapes(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arr = rng.integers(-100, 100, size=(3, 4, 5)) if dtype != np.uint8 else rng.integers(0, 255, size=(3, 4, 5))
    path = tmp_path / "x-idx3.gz"
    write_idx(path, arr, dtype)
    out = read_idx(path)
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr.astype(dtype))


def test_read_idx_uncompressed_and_1d(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    write_idx(path, np.arange(10), compress=False)
    np.testing.assert_array_equal(read_idx(path), np.arange(10))


def test_read_idx_rejects_non_idx(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(LowbitError, match="not an IDX file"):
        read_idx(path)
    path2 = tmp_path / "badtype"
    path2.write_bytes(bytes([0, 0, 0x42, 1]) + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(LowbitError, match="unknown IDX element type 0x42"):
        read_idx(path2)


def test_read_idx_truncated(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 5, 28, 28) + b"\x00" * 100)
    with pytest.raises(LowbitError):
        read_idx(path)


def make_fake_fmnist(root, n_test: int = 6, n_train: int | None = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    splits = {"test": ("t10k", n_test)}
    if n_train:
        splits["train"] = ("train", n_train)
    for split, (prefix, n) in splits.items():
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = rng.integers(0, 10, size=n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out


@pytest.fixture
def no_debian_dataset(monkeypatch, tmp_path):
    """Hide a system-wide Fashion-MNIST so the tests see only what they create."""
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "no-such-debian-dir"))
    monkeypatch.delenv(fm.ENV_VAR, raising=False)


def test_fashion_mnist_from_env_var(tmp_path, monkeypatch, no_debian_dataset):
    data = make_fake_fmnist(tmp_path)
    monkeypatch.setenv("LOWBIT_FASHION_MNIST", str(tmp_path))
    for split in ("test", "train"):
        images, labels = data[split]
        x, y = load_fashion_mnist(split)
        assert x.shape == (len(labels), 1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(labels).long())
        expected = (torch.from_numpy(images).float() / 255 - fm.MEAN) / fm.STD
        assert torch.allclose(x[:, 0], expected, atol=1e-6)
    raw, _ = load_fashion_mnist("test", normalize=False)
    assert raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose(raw[:, 0] * 255, torch.from_numpy(data["test"][0]).float(), atol=1e-4)


def test_fashion_mnist_explicit_root_wins(tmp_path, monkeypatch, no_debian_dataset):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_fake_fmnist(a, n_test=3, seed=1)
    make_fake_fmnist(b, n_test=5, seed=2)
    monkeypatch.setenv("LOWBIT_FASHION_MNIST", str(a))
    assert len(load_fashion_mnist("test")[0]) == 3
    assert len(load_fashion_mnist("test", root=b)[0]) == 5


def test_fashion_mnist_missing(tmp_path, monkeypatch, no_debian_dataset):
    with pytest.raises(LowbitError, match="Fashion-MNIST not found"):
        load_fashion_mnist("test")
    monkeypatch.setenv("LOWBIT_FASHION_MNIST", str(tmp_path / "empty"))
    with pytest.raises(LowbitError, match="LOWBIT_FASHION_MNIST"):
        load_fashion_mnist("test")
    with pytest.raises(LowbitError, match="split must be 'train' or 'test'"):
        load_fashion_mnist("validation", root=tmp_path)


def test_fashion_mnist_missing_train_split(tmp_path, no_debian_dataset):
    make_fake_fmnist(tmp_path, n_train=None)
    load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(LowbitError):
        load_fashion_mnist("train", root=tmp_path)


# ---------------------------------------------------------------- image folders

def _png(path, value, size=(10, 14), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_with_classes(tmp_path):
    # class folders are sorted by name: "bag" -> 0, "coat" -> 1, "shoe" -> 2
    _png(tmp_path / "shoe" / "a.png", 255)
    _png(tmp_path / "bag" / "b.png", 0)
    _png(tmp_path / "bag" / "c.PNG", 51)
    _png(tmp_path / "coat" / "nested" / "d.png", 102)
    (tmp_path / "coat" / "notes.txt").write_text("not an image")
    x, y, classes = load_image_folder(tmp_path, size=(8, 12), mean=(0.5,), std=(0.25,))
    assert classes == ["bag", "coat", "shoe"]
    assert x.shape == (4, 1, 8, 12) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 1, 2]
    # constant images: (v / 255 - mean) / std, exactly
    for img, v in zip(x, [0, 51, 102, 255]):
        assert torch.allclose(img, torch.full_like(img, (v / 255 - 0.5) / 0.25), atol=1e-5)


def test_image_folder_flat_rgb_and_limit(tmp_path):
    _png(tmp_path / "1.png", (255, 0, 51), mode="RGB")
    _png(tmp_path / "2.png", (0, 255, 0), mode="RGB")
    _png(tmp_path / "3.png", (10, 10, 10), mode="RGB")
    x, y, classes = load_image_folder(tmp_path, size=(5, 5), channels=3, mean=(0, 0, 0), std=(1, 1, 1))
    assert classes == [] and y.tolist() == [-1, -1, -1]
    assert x.shape == (3, 3, 5, 5)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]), atol=1e-5)
    x2, _, _ = load_image_folder(tmp_path, size=(5, 5), channels=3, mean=(0, 0, 0), std=(1, 1, 1), limit=2)
    assert len(x2) == 2 and torch.equal(x2, x[:2])
    # an RGB image read as grayscale becomes one channel (asked for: never silently)
    xg, _, _ = load_image_folder(tmp_path, size=(5, 5), channels=1)
    assert xg.shape == (3, 1, 5, 5)


def test_image_folder_errors(tmp_path):
    with pytest.raises(LowbitError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LowbitError, match="no images"):
        load_image_folder(tmp_path / "empty")
    _png(tmp_path / "one" / "a.png", 3)
    with pytest.raises(LowbitError, match="channels must be 1, 2, 3 or 4"):
        load_image_folder(tmp_path / "one", channels=5, mean=(0, 0), std=(1, 1))
    with pytest.raises(LowbitError, match="one value per channel"):
        load_image_folder(tmp_path / "one", channels=3)


def test_image_folder_feeds_quantize(tmp_path):
    import lowbit
    from tests.conftest import make_zoo

    for i in range(4):
        _png(tmp_path / f"c{i % 2}" / f"{i}.png", 60 * i)
    x, _, _ = load_image_folder(tmp_path, size=(16, 16))
    q = lowbit.quantize(make_zoo("resnet20"), x, w_bits=8, a_bits=8)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


# ---------------------------------------------------------------- calibration helpers

def test_sample_calibration_is_deterministic():
    x = torch.randn(50, 1, 4, 4)
    a = sample_calibration(x, 20, seed=7)
    assert torch.equal(a, sample_calibration(x, 20, seed=7))
    assert not torch.equal(a, sample_calibration(x, 20, seed=8))
    assert a.shape == (20, 1, 4, 4)
    # without replacement: a permutation of the data when n == len
    full = sample_calibration(x, 50, seed=0)
    idx = [int((x == img).all((1, 2, 3)).nonzero()) for img in full]
    assert sorted(idx) == list(range(50)) and idx != list(range(50))
    with pytest.raises(LowbitError, match="only 50 are available"):
        sample_calibration(x, 51)


def test_as_calibration_tensor_forms_and_limit():
    x = torch.randn(10, 1, 4, 4, dtype=torch.float64)
    out = as_calibration_tensor(x)
    assert out.dtype == torch.float32 and torch.equal(out, x.float())
    batches = [(x[:4], torch.zeros(4)), (x[4:], torch.ones(6))]
    assert torch.equal(as_calibration_tensor(batches), x.float())
    assert torch.equal(as_calibration_tensor(batches, limit=3), x[:3].float())
    assert torch.equal(as_calibration_tensor(iter(x)), x.float())  # single 3-D images
    consumed = []

    def gen():
        for i in range(0, 10, 2):
            consumed.append(i)
            yield x[i:i + 2]
    assert len(as_calibration_tensor(gen(), limit=4)) == 4
    assert consumed == [0, 2]  # stops reading once the limit is reached
