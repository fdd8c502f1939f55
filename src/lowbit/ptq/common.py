"""Shared PTQ steps: forward passes over calibration data and range calibration of quantizers."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..progress import progress_bar
from ..quant.layers import quant_layers
from ..quant.quantizer import ActObserver


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A private RNG on ``device`` seeded with ``seed``.

    PTQ never draws from torch's global RNG: that would change the caller's random state and
    mix with other threads' draws.
    """
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def fresh_batch(data: Tensor, device: str | torch.device, index: slice | Tensor = slice(None)) -> Tensor:
    """``data[index]`` on ``device`` as a new tensor, to be fed to a model.

    Never a view of ``data``: a model may change its input in place (``x.sub_(mean)``), which
    must change neither the caller's tensor nor the calibration set later passes read again.
    """
    return data[index].to(device, copy=True)


@torch.no_grad()
def run_batches(model: nn.Module, calib: Tensor, cfg: QuantConfig, desc: str = "calibrating") -> None:
    """Forward ``calib`` through ``model`` in batches (outputs discarded)."""
    starts = range(0, len(calib), cfg.batch_size)
    for i in progress_bar(starts, desc=desc, enable=cfg.progress):
        model(fresh_batch(calib, cfg.device, slice(i, i + cfg.batch_size)))


@contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Temporarily run ``model`` (a quantized model, or one quantized layer) in floating point."""
    layers = [layer for _, layer in quant_layers(model)]
    saved = [(l.weight_quant.enabled, l.input_quant.enabled) for l in layers]
    for l in layers:
        l.weight_quant.enabled = l.input_quant.enabled = False
    try:
        yield
    finally:
        for l, (w, a) in zip(layers, saved):
            l.weight_quant.enabled, l.input_quant.enabled = w, a


@torch.no_grad()
def observe_fp_inputs(model: nn.Module, calib: Tensor, cfg: QuantConfig) -> dict[str, ActObserver]:
    """Statistics of every quantized input, seen in the floating-point network."""
    targets = [(n, l) for n, l in quant_layers(model) if l.input_quant.enabled]
    with quantizers_disabled(model):
        for i, (_, layer) in enumerate(targets):
            layer.input_quant.start_observing(seed=cfg.seed + i)
        try:
            run_batches(model, calib, cfg, desc="observing activations")
        finally:
            # every observer comes off, whatever happened; an exception (or KeyboardInterrupt)
            # propagates as it is: "saw no data" would only hide why the forward pass stopped
            observers = {n: l.input_quant.observer for n, l in targets}
            for _, layer in targets:
                layer.input_quant.observer = None
    unseen = [n for n, obs in observers.items() if obs is None or not obs.samples]
    if unseen:  # a complete forward pass that never reached these layers
        raise LowbitError(f"an activation quantizer saw no data during calibration (layers {unseen[:3]})")
    return observers


@torch.no_grad()
def calibrate_weights(model: nn.Module, range_fn: Callable, **kwargs) -> None:
    """Set every enabled weight quantizer's scales with ``range_fn``."""
    for _, layer in quant_layers(model):
        if layer.weight_quant.enabled:
            layer.weight_quant.calibrate(layer.weight, range_fn, **kwargs)


@torch.no_grad()
def calibrate_inputs(model: nn.Module, observers: dict[str, ActObserver], range_fn: Callable, **kwargs) -> None:
    """Set every observed input quantizer's range with ``range_fn`` on the sampled values."""
    layers = dict(quant_layers(model))
    for name, obs in observers.items():
        layers[name].input_quant.calibrate(obs.values(), range_fn, **kwargs)


def train_only(model: nn.Module, trainable: list[Tensor]) -> list[tuple[Tensor, bool]]:
    """Freeze every parameter of ``model`` except ``trainable``; returns what ``restore_grad`` needs."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    return saved


def restore_grad(saved: list[tuple[Tensor, bool]]) -> None:
    for p, flag in saved:
        p.requires_grad_(flag)
