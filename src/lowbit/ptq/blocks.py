"""Blocks of a quantized network and their cached inputs and outputs, for block-wise PTQ.

A block is the largest module that takes one tensor, returns one tensor, runs once per forward
pass and holds a manageable number of quantized layers: a residual block, an inverted residual,
a conv-BN-ReLU triple, or a lone quantized layer of any kind (Conv1d, Conv2d, ConvTranspose2d,
Linear, or a subclass with its own forward). Containers (``nn.Sequential`` of several blocks)
are opened. This works on any CNN, without knowing its architecture.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import LowbitError
from ..quant.layers import QUANT_LAYERS, QuantLayer, quant_layers
from .common import fresh_batch, quantizers_disabled

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class Block:
    """A reconstruction unit: a module and its quantized layers (in module order)."""

    name: str
    module: nn.Module
    layers: list[tuple[str, QuantLayer]] = field(default_factory=list)


@dataclass
class _CallRecord:
    calls: int = 0
    single_tensor: bool = True
    first: int = -1


def _probe(model: nn.Module, example: Tensor) -> dict[str, _CallRecord]:
    """How each module is called in one forward pass (count, single tensor in and out, order)."""
    records: dict[str, _CallRecord] = {}
    handles = []
    counter = [0]

    def hook(name: str):
        def fn(module, args, kwargs, out):
            rec = records.setdefault(name, _CallRecord())
            rec.calls += 1
            if rec.first < 0:
                rec.first = counter[0]
                counter[0] += 1
            rec.single_tensor &= (len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
                                  and isinstance(out, Tensor))
        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    try:
        with torch.no_grad(), quantizers_disabled(model):
            model(example.clone())  # the model may change its input in place
    finally:
        for h in handles:
            h.remove()
    return records


def find_blocks(model: nn.Module, example: Tensor, max_layers: int = 8) -> list[Block]:
    """Partition the quantized layers of ``model`` into blocks, in execution order.

    Args:
        model: a prepared (quantized) model.
        example: one or two input samples, to see how modules are called.
        max_layers: blocks with more quantized layers than this are split into their children.
    """
    records = _probe(model, example)
    blocks: list[Block] = []

    def count(module: nn.Module) -> int:
        return sum(isinstance(m, QUANT_LAYERS) for m in module.modules())

    def usable(name: str) -> bool:
        rec = records.get(name)
        return rec is not None and rec.calls == 1 and rec.single_tensor

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            n = count(child)
            if n == 0:
                continue
            if isinstance(child, QUANT_LAYERS):
                rec = records.get(name)
                if rec is None or rec.calls != 1:
                    raise LowbitError(f"layer {name!r} runs {0 if rec is None else rec.calls} times per forward "
                                      "pass; block reconstruction needs each layer used exactly once")
                blocks.append(Block(name, child))
                continue
            several = sum(count(c) > 0 for c in child.children()) >= 2
            if usable(name) and n <= max_layers and not (isinstance(child, _CONTAINERS) and several):
                blocks.append(Block(name, child))
            else:
                visit(child, name)

    visit(model, "")
    for block in blocks:
        block.layers = [(f"{block.name}.{n}" if n else block.name, m) for n, m in quant_layers(block.module)]
    blocks.sort(key=lambda b: records[b.name].first)
    return blocks


class TensorCache:
    """``N x ...`` float tensor kept in memory, or in a memory-mapped file when over a byte budget."""

    def __init__(self, n: int, sample_shape: tuple[int, ...], limit_bytes: int, device: torch.device) -> None:
        shape = (n,) + tuple(sample_shape)
        nbytes = int(np.prod(shape)) * 4
        self.device = device
        self._file: str | None = None
        if nbytes <= limit_bytes:
            self.data: Tensor | np.memmap = torch.empty(shape, device=device)
        else:
            fd, self._file = tempfile.mkstemp(prefix="lowbit-cache-", suffix=".f32")
            os.close(fd)
            self.data = np.memmap(self._file, dtype=np.float32, mode="w+", shape=shape)

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def __len__(self) -> int:
        return self.data.shape[0]

    def write(self, start: int, values: Tensor) -> None:
        if self.on_disk:
            self.data[start:start + len(values)] = values.detach().float().cpu().numpy()
        else:
            self.data[start:start + len(values)] = values.detach()

    def get(self, index: Tensor) -> Tensor:
        """Rows ``index`` on the cache's device."""
        if self.on_disk:
            rows = np.sort(index.cpu().numpy())  # sorted reads are sequential on disk
            order = torch.from_numpy(np.argsort(np.argsort(index.cpu().numpy())))
            return torch.from_numpy(np.ascontiguousarray(self.data[rows]))[order].to(self.device)
        return self.data[index.to(self.data.device)]

    def close(self) -> None:
        if self._file is not None:
            del self.data
            os.unlink(self._file)
            self._file = None

    def __del__(self) -> None:  # temporary files never outlive the cache
        try:
            self.close()
        except Exception:
            pass


def loss_summary(losses: list[float]) -> dict[str, float]:
    """Mean loss over the first and the last fifth of a run (at most 20 steps each)."""
    if not losses:
        return {"first": float("nan"), "last": float("nan")}
    k = max(1, min(20, len(losses) // 5))
    return {"first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k}


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_io(model: nn.Module, module: nn.Module, data: Tensor, batch_size: int,
                     limit_bytes: int, device: torch.device, want_output: bool = True,
                     want_input: bool = True) -> tuple[TensorCache | None, TensorCache | None]:
    """Inputs and/or outputs of ``module`` inside ``model`` over ``data``; stops each pass early.

    The input is copied before ``module`` runs: a forward hook would see it after the module,
    which may have changed it in place (e.g. ``x.mul_(2)`` or ``x += ...`` on its input).
    What is not wanted comes back as None.
    """
    if not (want_input or want_output):
        raise LowbitError("capture_block_io needs want_input or want_output")
    caches: list[TensorCache | None] = [None, None]
    start = [0]
    reached = [False]

    def pre_hook(_, args):
        x = args[0]
        reached[0] = True
        if want_input:
            if caches[0] is None:
                caches[0] = TensorCache(len(data), x.shape[1:], limit_bytes, device)
            caches[0].write(start[0], x)
        if not want_output:
            raise _StopForward

    def hook(_, args, out):
        if caches[1] is None:
            caches[1] = TensorCache(len(data), out.shape[1:], limit_bytes, device)
        caches[1].write(start[0], out)
        raise _StopForward

    handles = [module.register_forward_pre_hook(pre_hook)]
    if want_output:
        handles.append(module.register_forward_hook(hook))
    try:
        for i in range(0, len(data), batch_size):
            start[0] = i
            try:
                model(fresh_batch(data, device, slice(i, i + batch_size)))
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if not reached[0]:
        raise LowbitError("a block was not reached by the forward pass")
    return caches[0], caches[1]
