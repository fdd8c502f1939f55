"""Calibration data: what users may pass, how much of it is read, and deterministic sampling.

Accepted forms (``lowbit.quantize(model, calib, ...)``):

- a float tensor ``N x C x H x W``, or an ``(input, target)`` pair of tensors (the target is
  ignored);
- a map-style ``torch.utils.data.Dataset`` (``len`` and integer indexing) whose items are
  images ``C x H x W``, ``(image, target)`` pairs, or dicts (with ``input_key``);
- any other iterable of batches (a ``DataLoader``, a list, a generator): each batch a tensor
  ``N x C x H x W`` (or a single image ``C x H x W``), an ``(input, target, ...)`` tuple or list
  with the input first, or a dict from which ``input_key`` picks the input.

How much is used, for ``n = calib_size``:

- tensors and Datasets, whose length is known: everything when there are at most ``n`` images,
  else ``n`` images drawn without replacement by ``seed`` (``sample_calibration``). A Dataset
  gives exactly the images its stacked tensor would give, and only those items are read;
- other iterables: the first ``n`` images in iteration order, reading only the batches needed
  (an infinite generator or a loader over a huge dataset is not consumed). A shuffled
  ``DataLoader`` thus gives a subset chosen by its own generator: seed it to reproduce a run.

Models with Conv1d layers also take ``N x C x L`` sequences (``ranks=(3, 4)``, from
``graph.surgery.input_ranks``): there a single sample is ``C x L``.

Integer tensors and 1-D vectors where images are expected (class labels passed as input, e.g. a
loader yielding ``(label, image)``) are refused with a message saying what was expected.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from ..errors import LowbitError

_EXPECTED = "normalized float images N x C x H x W"
_ORDER_HINT = ("batches must be (input, target) with the input first, or dicts with input_key= "
               "naming the input")


def sample_indices(length: int, n: int, seed: int = 0) -> Tensor:
    """The positions ``sample_calibration`` picks: ``n`` of ``range(length)`` without replacement."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LowbitError(f"the number of calibration images must be a positive integer, got {n!r}")
    if n > length:
        raise LowbitError(f"asked for {n} calibration images but only {length} are available")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=gen)[:n]


def sample_calibration(images: Tensor, n: int, seed: int = 0) -> Tensor:
    """Pick ``n`` images without replacement, the same ones for the same seed."""
    return images[sample_indices(len(images), n, seed).to(images.device)]


def split_batch(item: Any, where: str, input_key: str | None = None,
                target_key: str | None = None) -> tuple[Any, Any]:
    """``(input, target)`` of one batch or dataset item; the target is None when there is none.

    Tuples and lists hold the input first; dicts need ``input_key`` (and ``target_key`` when a
    target is wanted). A bare tensor is an input without a target.
    """
    if isinstance(item, Mapping):
        keys = sorted(map(str, item))
        if input_key is None:
            raise LowbitError(f"{where} is a dict with keys {keys}; pass input_key= naming the input "
                              f"(e.g. input_key={keys[0]!r})" if keys else f"{where} is an empty dict")
        for key in (input_key, target_key):
            if key is not None and key not in item:
                raise LowbitError(f"{where} has no key {key!r}; its keys: {keys}")
        return item[input_key], (item[target_key] if target_key is not None else None)
    if input_key is not None:
        raise LowbitError(f"input_key={input_key!r} applies to dict batches, but {where} is a "
                          f"{type(item).__name__}")
    if isinstance(item, (tuple, list)):
        if not item:
            raise LowbitError(f"{where} is an empty {type(item).__name__}")
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def _ranks_text(ranks: tuple[int, ...]) -> str:
    return " or ".join({3: "3-D (N x C x L)", 4: "4-D (N x C x H x W)"}.get(r, f"{r}-D") for r in ranks)


def check_input(x: Any, where: str, single_ok: bool = True, ranks: tuple[int, ...] = (4,)) -> Tensor:
    """Validate one input tensor (a batch, or a single sample if ``single_ok``) as a batch.

    ``ranks``: the accepted numbers of dimensions, batch included (4: images; a model with Conv1d
    layers also takes 3). A single sample has one dimension less than the smallest rank.
    Refuses what looks like labels (integer dtype, 1-D) with a message that says what was expected.
    """
    if not isinstance(x, Tensor):
        raise LowbitError(f"calibration batches must hold tensors, got {type(x).__name__} as the input "
                          f"of {where} (expected {_EXPECTED}; {_ORDER_HINT})")
    if not x.is_floating_point():
        hint = (f"; it looks like class labels: {_ORDER_HINT}" if x.dim() <= 1
                else "; convert images to float and normalize them")
        raise LowbitError(f"calibration data must be floating point ({_EXPECTED}), got {x.dtype} "
                          f"of shape {tuple(x.shape)} in {where}{hint}")
    if x.dim() == min(ranks) - 1 and single_ok:
        x = x.unsqueeze(0)
    if x.dim() not in ranks:
        hint = f"; a vector looks like labels or targets: {_ORDER_HINT}" if x.dim() <= 1 else ""
        raise LowbitError(f"calibration data must be {_ranks_text(ranks)}, got shape {tuple(x.shape)} "
                          f"in {where}{hint}")
    return x


def _as_pair(calib: Any, ranks: tuple[int, ...] = (4,)) -> Tensor | None:
    """The input of ``calib`` when it is an ``(input, target)`` pair of tensors, else None.

    A pair is two tensors of the same length whose first is 4-D and whose second cannot be a
    second batch of images (an integer tensor, or fewer dimensions: labels, soft labels, masks).
    Two float batches of images stay two batches.
    """
    if not (isinstance(calib, (tuple, list)) and len(calib) == 2 and all(isinstance(t, Tensor) for t in calib)):
        return None
    x, y = calib
    if x.dim() not in ranks or y.dim() == 0 or len(y) != len(x):
        return None
    return x if (not y.is_floating_point() or y.dim() < x.dim()) else None


def is_map_dataset(calib: Any) -> bool:
    """A torch map-style Dataset with a length (read by index, not by iteration)."""
    return (isinstance(calib, Dataset) and not isinstance(calib, IterableDataset)
            and hasattr(calib, "__len__"))


def _read_dataset(data: Dataset, indices: Iterable[int], input_key: str | None,
                  ranks: tuple[int, ...] = (4,)) -> list[Tensor]:
    """Read the items at ``indices`` (single images) as 1 x C x H x W tensors."""
    out = []
    for i in indices:
        where = f"dataset item {i}"
        x = check_input(split_batch(data[i], where, input_key)[0], where, ranks=ranks)
        if len(x) != 1:
            raise LowbitError(f"{where} holds {len(x)} images; Dataset items must be single images "
                              f"C x H x W (pass a DataLoader for datasets of batches)")
        out.append(x)
    return out


def _read_iterable(iterator: Iterator, limit: int | None, input_key: str | None,
                   ranks: tuple[int, ...] = (4,)) -> list[Tensor]:
    """Batches from ``iterator`` until ``limit`` images are read (all of them when None)."""
    batches, total = [], 0
    for i, item in enumerate(iterator):
        where = f"calibration batch {i}"
        x = check_input(split_batch(item, where, input_key)[0], where, ranks=ranks)
        batches.append(x)
        total += len(x)
        if limit is not None and total >= limit:
            break  # read no further: the iterable may be a huge loader or infinite
    return batches


def concat_batches(batches: list[Tensor], limit: int | None = None) -> Tensor:
    """One validated float tensor from ``batches`` (first ``limit`` images)."""
    if not batches:
        raise LowbitError("calibration data is empty")
    shapes = {tuple(b.shape[1:]) for b in batches}
    if len(shapes) > 1:
        raise LowbitError(f"calibration batches differ in shape: {sorted(shapes)}")
    x = torch.cat([b.detach().float().cpu() for b in batches]) if len(batches) > 1 else batches[0].detach().float()
    if limit is not None:
        x = x[:limit]
    if x.numel() == 0 or len(x) == 0:
        raise LowbitError("calibration data is empty")
    if not torch.isfinite(x).all():
        raise LowbitError("calibration data contains NaN or infinite values")
    return x


def _top_level(calib: Any, input_key: str | None, ranks: tuple[int, ...] = (4,)) -> Tensor | None:
    """The tensor a tensor, a pair or a single dict batch stands for; None for other forms."""
    if isinstance(calib, Tensor):
        if input_key is not None:
            raise LowbitError(f"input_key={input_key!r} applies to dict batches, but the calibration data is a tensor")
        return check_input(calib, "the calibration tensor", single_ok=False, ranks=ranks)
    pair = _as_pair(calib, ranks)
    if pair is not None:
        if input_key is not None:
            raise LowbitError(f"input_key={input_key!r} applies to dict batches, but the calibration data "
                              f"is an (input, target) pair")
        return check_input(pair, "the input of the (input, target) pair", single_ok=False, ranks=ranks)
    if isinstance(calib, Mapping):
        return check_input(split_batch(calib, "the calibration dict", input_key)[0], "the calibration dict",
                           single_ok=False, ranks=ranks)
    return None


def _iterator(calib: Any) -> Iterator:
    try:
        return iter(calib)
    except TypeError:
        raise LowbitError(
            f"calibration data must be a tensor N x C x H x W or an iterable of batches (a DataLoader, "
            f"a list, a Dataset, an (input, target) pair of tensors), got {type(calib).__name__}") from None


def read_calibration(calib: Any, n: int, seed: int = 0, input_key: str | None = None,
                     ranks: tuple[int, ...] = (4,)) -> Tensor:
    """The calibration images ``lowbit.quantize`` uses: at most ``n``, reading no more than needed.

    Tensors and map-style Datasets with more than ``n`` images give ``n`` of them sampled by
    ``seed``; other iterables give their first ``n`` images (see the module docstring).

    Raises:
        LowbitError: for empty, non-floating, label-like, non-4-D or non-finite data, and for
            dict batches without ``input_key``.
    """
    x = _top_level(calib, input_key, ranks)
    if x is not None:
        x = concat_batches([x], None)
        return sample_calibration(x, n, seed) if len(x) > n else x
    if is_map_dataset(calib):
        length = len(calib)
        indices = range(length) if length <= n else sample_indices(length, n, seed).tolist()
        return concat_batches(_read_dataset(calib, indices, input_key, ranks), None)
    return concat_batches(_read_iterable(_iterator(calib), n, input_key, ranks), n)


def as_calibration_tensor(calib: Any, limit: int | None = None, input_key: str | None = None,
                          ranks: tuple[int, ...] = (4,)) -> Tensor:
    """One tensor from any accepted form, keeping its order; at most the first ``limit`` images.

    Unlike ``read_calibration`` nothing is sampled: this is "the data, as a tensor".

    Raises:
        LowbitError: for empty, non-floating, label-like, non-4-D or non-finite data.
    """
    x = _top_level(calib, input_key, ranks)
    if x is not None:
        return concat_batches([x], limit)
    if is_map_dataset(calib):
        indices = range(min(len(calib), limit) if limit is not None else len(calib))
        return concat_batches(_read_dataset(calib, indices, input_key, ranks), limit)
    return concat_batches(_read_iterable(_iterator(calib), limit, input_key, ranks), limit)
