"""Shared PTQ steps: forward passes over calibration data and range calibration of quantizers."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..progress import progress_bar
from ..quant.layers import quant_layers
from ..quant.quantizer import ActObserver


@torch.no_grad()
def run_batches(model: nn.Module, calib: Tensor, cfg: QuantConfig, desc: str = "calibrating") -> None:
    """Forward ``calib`` through ``model`` in batches (outputs discarded)."""
    starts = range(0, len(calib), cfg.batch_size)
    for i in progress_bar(starts, desc=desc, enable=cfg.progress):
        model(calib[i:i + cfg.batch_size].to(cfg.device))


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
            observers = {n: l.input_quant.stop_observing() for n, l in targets}
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
