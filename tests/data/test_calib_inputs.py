"""Calibration inputs: (input, target) pairs, dict batches, label tensors, Datasets, lazy reading."""
from __future__ import annotations

import itertools
from typing import Any, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lowbit
from lowbit import LowbitError
from lowbit.data import sample_calibration
from lowbit.data.calib import as_calibration_tensor, read_calibration
from lowbit.qat.run import _as_labelled
from tests.conftest import calib_tensor, make_zoo

X = calib_tensor(24)
Y = torch.arange(24) % 10


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_zoo("resnet20")


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Counting(Dataset):
    """A map-style dataset of ``(image, label)`` (or dict) items that counts the items read."""

    def __init__(self, x: Tensor, y: Tensor, as_dict: bool = False, length: int | None = None) -> None:
        self.x, self.y, self.as_dict = x, y, as_dict
        self.length = length or len(x)
        self.read: list[int] = []

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        self.read.append(i)
        img, label = self.x[i % len(self.x)], int(self.y[i % len(self.y)])
        return {"image": img, "label": label} if self.as_dict else (img, label)


# ---------------------------------------------------------------- (input, target) pairs

def test_input_target_pair_as_the_whole_calib(model):
    ref = lowbit.quantize(model, X)
    for pair in ((X, Y), [X, Y], (X, torch.randn(24, 10)), (X, torch.randint(0, 2, (24, 1, 16, 16)))):
        assert _same(lowbit.quantize(model, pair), ref)
    # more images than calib_size: sampled exactly as the tensor is
    assert _same(lowbit.quantize(model, (X, Y), calib_size=10, seed=3), lowbit.quantize(model, X, calib_size=10, seed=3))


def test_two_float_batches_stay_two_batches():
    a, b = calib_tensor(4, seed=1), calib_tensor(4, seed=2)
    assert torch.equal(read_calibration((a, b), 100), torch.cat([a, b]))
    with pytest.raises(LowbitError, match="differ in shape"):
        read_calibration([a, calib_tensor(4, size=12)], 100)


def test_pairs_as_batches(model):
    ref = lowbit.quantize(model, X)
    batches = [(xb, yb) for xb, yb in zip(X.split(5), Y.split(5))]
    assert _same(lowbit.quantize(model, batches), ref)
    assert _same(lowbit.quantize(model, [[xb, yb, "extra"] for xb, yb in batches]), ref)


# ---------------------------------------------------------------- label tensors are refused

@pytest.mark.parametrize("calib, pattern", [
    (DataLoader(TensorDataset(Y, X), batch_size=6), r"looks like class labels.*input first"),  # (label, image)
    ([(yb, xb) for xb, yb in zip(X.split(6), Y.split(6))], r"looks like class labels"),
    ((Y, X), r"looks like class labels"),
    (Y, r"floating point.*looks like class labels"),
    (Y.float(), r"4-D.*labels"),
    ([Y.float()], r"4-D.*labels"),
])
def test_label_tensors_are_refused_with_what_was_expected(model, calib, pattern):
    with pytest.raises(LowbitError, match=pattern) as info:
        lowbit.quantize(model, calib)
    assert "N x C x H x W" in str(info.value)


# ---------------------------------------------------------------- dict batches

def _dicts(n_per: int = 5) -> list[dict]:
    return [{"image": xb, "label": yb} for xb, yb in zip(X.split(n_per), Y.split(n_per))]


def test_dict_batches_with_input_key(model):
    ref = lowbit.quantize(model, X)
    assert _same(lowbit.quantize(model, _dicts(), input_key="image"), ref)
    loader = DataLoader(Counting(X, Y, as_dict=True), batch_size=7)  # default collation gives dicts
    assert _same(lowbit.quantize(model, loader, input_key="image"), ref)
    assert _same(lowbit.quantize(model, {"image": X, "label": Y}, input_key="image"), ref)


@pytest.mark.parametrize("calib, key, pattern", [
    (_dicts(), None, r"dict with keys \['image', 'label'\]; pass input_key="),
    (_dicts(), "img", r"no key 'img'; its keys: \['image', 'label'\]"),
    (X, "image", r"input_key='image' applies to dict batches"),
    ([(X, Y)], "image", r"input_key='image' applies to dict batches"),
    ([{"image": Y, "label": X}], "image", r"looks like class labels"),
])
def test_dict_batch_errors(model, calib, key, pattern):
    with pytest.raises(LowbitError, match=pattern):
        lowbit.quantize(model, calib, **({"input_key": key} if key else {}))


# ---------------------------------------------------------------- Datasets

def test_dataset_reads_only_the_sampled_items(model):
    data = Counting(X, Y)
    q = lowbit.quantize(model, data, calib_size=10, seed=5)
    assert len(data.read) == 10 and len(set(data.read)) == 10
    # the same images the stacked tensor gives, in the same order
    assert torch.equal(read_calibration(Counting(X, Y), 10, seed=5), sample_calibration(X, 10, seed=5))
    assert _same(q, lowbit.quantize(model, X, calib_size=10, seed=5))
    small = Counting(X, Y)
    assert _same(lowbit.quantize(model, small), lowbit.quantize(model, X))
    assert small.read == list(range(24))


def test_huge_dataset_is_not_read_whole():
    data = Counting(X, Y, length=10 ** 6)
    out = read_calibration(data, 16, seed=0)
    assert out.shape == (16, 1, 16, 16) and len(data.read) == 16
    data = Counting(X, Y, as_dict=True, length=10 ** 6)
    assert read_calibration(data, 8, input_key="image").shape == (8, 1, 16, 16) and len(data.read) == 8
    assert as_calibration_tensor(Counting(X, Y), limit=5).shape == (5, 1, 16, 16)


def test_tensor_dataset_and_dataset_errors(model):
    assert _same(lowbit.quantize(model, TensorDataset(X, Y)), lowbit.quantize(model, X))
    assert _same(lowbit.quantize(model, TensorDataset(X)), lowbit.quantize(model, X))
    with pytest.raises(LowbitError, match="empty"):
        lowbit.quantize(model, TensorDataset(X[:0], Y[:0]))
    with pytest.raises(LowbitError, match=r"dataset item 0 .*input_key="):
        lowbit.quantize(model, Counting(X, Y, as_dict=True))
    with pytest.raises(LowbitError, match=r"looks like class labels"):
        lowbit.quantize(model, TensorDataset(Y, X))
    with pytest.raises(LowbitError, match="single images"):
        lowbit.quantize(model, TensorDataset(X.reshape(6, 4, 1, 16, 16)))


# ---------------------------------------------------------------- lazy reading of iterables

def test_infinite_generator_is_read_only_as_far_as_needed(model):
    pulled = []

    def forever() -> Iterator[tuple[Tensor, Tensor]]:
        for i in itertools.count():
            pulled.append(i)
            yield calib_tensor(4, seed=i), torch.zeros(4, dtype=torch.long)

    q = lowbit.quantize(model, forever(), calib_size=10)
    assert pulled == [0, 1, 2]  # 3 batches of 4 cover 10 images
    first = torch.cat([calib_tensor(4, seed=i) for i in range(3)])[:10]
    assert _same(q, lowbit.quantize(model, first))


def test_dataloader_over_a_huge_dataset_is_not_consumed(model):
    data = Counting(X, Y, length=10 ** 6)
    q = lowbit.quantize(model, DataLoader(data, batch_size=4, shuffle=False), calib_size=12)
    assert data.read == list(range(12))
    assert _same(q, lowbit.quantize(model, X[:12]))


def test_iterables_give_their_first_calib_size_images(model):
    q = lowbit.quantize(model, list(X.split(5)), calib_size=12)
    assert _same(q, lowbit.quantize(model, X[:12]))
    # tensors (and Datasets) keep the seeded sample
    assert not torch.equal(read_calibration(X, 12, seed=0), X[:12])


# ---------------------------------------------------------------- QAT training data

def test_qat_training_data_forms():
    ref_x, ref_y = _as_labelled((X, Y), "train_data")
    forms = {
        "batches": ([(xb, yb) for xb, yb in zip(X.split(5), Y.split(5))], {}),
        "dicts": (_dicts(), {"input_key": "image", "target_key": "label"}),
        "dataset": (TensorDataset(X, Y), {}),
        "dict dataset": (Counting(X, Y, as_dict=True), {"input_key": "image", "target_key": "label"}),
    }
    for label, (data, keys) in forms.items():
        x, y = _as_labelled(data, "train_data", **keys)
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y), label


@pytest.mark.parametrize("data, keys, pattern", [
    (_dicts(), {"input_key": "image"}, r"has no labels.*target_key="),
    (_dicts(), {}, r"pass input_key="),
    ([(yb, xb) for xb, yb in zip(X.split(6), Y.split(6))], {}, r"looks like class labels"),
    (list(X.split(6)), {}, r"has no labels"),
    ([], {}, r"empty"),
])
def test_qat_training_data_errors(data, keys, pattern):
    with pytest.raises(LowbitError, match=pattern):
        _as_labelled(data, "train_data", **keys)
    with pytest.raises(LowbitError, match=pattern):
        lowbit.qat(make_zoo("resnet20"), data, method="lsq", epochs=1, log=lambda s: None, **keys)
