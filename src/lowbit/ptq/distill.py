"""Group-wise quantization with limited data and two-stage knowledge distillation.

Yuan, Chen, Hu, Peng (ICPR 2020). The quantized student starts from the MSE-clipping baseline
(any granularity: per-layer, per-channel or G groups of output channels), then learns its
weights (straight-through) and the step sizes of weights and activations (LSQ) from the FP
teacher, with a few images:

(a) independent (block-wise) optimisation: every block, fed the teacher's block input, fits the
    teacher's block output (mean squared error);
(b) joint (global) optimisation: the whole student fits the teacher's logits (KL divergence at a
    temperature) on augmented calibration images.

``block_iters=0`` or ``joint_iters=0`` switch a stage off, which gives the paper's ablation
(init / global only / block only / both).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Iterable

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..options import Range
from ..progress import progress_bar
from ..quant.layers import QuantConv2d, QuantLinear, quant_layers
from ..quant.learnable import LearnedStepAct, LearnedStepWeight, commit_stand_ins
from ..record import record_of
from ..train.distillation import distillation_loss
from ..train.fp import augment_batch
from .start import MseOptions, mse_start_with_teacher
from .blocks import capture_block_io, find_blocks, loss_summary
from .common import generator, quantizers_disabled, restore_grad, train_only
from .reconstruct import block_loss
from .registry import register_method


@dataclass(frozen=True)
class DistillOptions:
    """Options of two-stage distillation.

    Attributes:
        block_iters: steps per block of stage (a); 0 switches block-wise supervision off.
        joint_iters: steps of stage (b); 0 switches global supervision off.
        batch_size: images per step.
        lr: Adam learning rate of the latent weights and biases.
        scale_lr: Adam learning rate of the weight and activation step sizes.
        temperature: softmax temperature of the logit distillation.
        augment: random shifts and flips of the calibration images in stage (b).
        max_block_layers: larger modules are split into smaller blocks.
        cache_mb: in-memory budget per cached tensor; larger caches go to a temporary file.
    """

    block_iters: Annotated[int, Range(ge=0)] = 300
    joint_iters: Annotated[int, Range(ge=0)] = 1000
    batch_size: Annotated[int, Range(ge=1)] = 32
    lr: Annotated[float, Range(gt=0)] = 1e-4
    scale_lr: Annotated[float, Range(ge=0)] = 1e-3
    temperature: Annotated[float, Range(gt=0)] = 1.0
    augment: bool = True
    max_block_layers: Annotated[int, Range(ge=1)] = 8
    cache_mb: Annotated[int, Range(ge=0)] = 1024

    def __post_init__(self) -> None:
        if self.block_iters < 0 or self.joint_iters < 0 or self.batch_size < 1:
            raise LowbitError("distillation: block_iters, joint_iters >= 0 and batch_size >= 1")
        if self.lr <= 0 or self.scale_lr < 0 or self.temperature <= 0:
            raise LowbitError("distillation: lr and temperature must be > 0, scale_lr >= 0")


Layers = Iterable[tuple[str, QuantConv2d | QuantLinear]]


class _Learnable:
    """Swaps learned-step quantizers into ``layers`` and collects the trainable tensors."""

    def __init__(self, layers: Layers) -> None:
        self.layers = [layer for _, layer in layers]
        self.weights: list[Tensor] = []
        self.scales: list[Tensor] = []
        for layer in self.layers:
            if layer.weight_quant.enabled:
                layer.weight_quant = LearnedStepWeight(layer.weight_quant, layer.weight)
                self.scales.append(layer.weight_quant.scale)
            if layer.input_quant.enabled:
                layer.input_quant = LearnedStepAct(layer.input_quant)
                self.scales.append(layer.input_quant.scale)
            self.weights += [p for p in (layer.weight, layer.bias) if p is not None]

    def optimizer(self, opts: DistillOptions) -> torch.optim.Optimizer:
        groups = [{"params": self.weights, "lr": opts.lr}]
        if opts.scale_lr > 0 and self.scales:
            groups.append({"params": self.scales, "lr": opts.scale_lr})
        return torch.optim.Adam(groups)

    def commit(self) -> None:
        commit_stand_ins(self.layers)


def _train_steps(params_owner: _Learnable, opts: DistillOptions, iters: int, loss_fn, desc: str,
                 progress: bool | None) -> dict[str, float]:
    """Adam with cosine decay over ``iters`` steps of ``loss_fn(step)``; returns first/last loss."""
    opt = params_owner.optimizer(opts)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    history: list[float] = []
    bar = progress_bar(range(iters), desc=desc, enable=progress)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{history[-1]:.4g}")
    return loss_summary(history)


def block_stage(qmodel: nn.Module, teacher: nn.Module, calib: Tensor, cfg: QuantConfig,
                opts: DistillOptions, gen: torch.Generator) -> list[dict]:
    """Stage (a): every block fits the teacher's block output from the teacher's block input."""
    device = torch.device(cfg.device)
    blocks = find_blocks(qmodel, calib[:2].to(device), opts.max_block_layers)
    teacher_modules = dict(teacher.named_modules())
    limit = opts.cache_mb * 2 ** 20
    report = []
    for block in progress_bar(blocks, desc="block-wise distillation", enable=cfg.progress if len(blocks) > 1 else False):
        with quantizers_disabled(teacher):
            inputs, targets = capture_block_io(teacher, teacher_modules[block.name], calib, cfg.batch_size,
                                               limit, device)
        learn = _Learnable(block.layers)
        saved = train_only(block.module, learn.weights + learn.scales)
        n = len(inputs)

        def loss_fn(_step: int) -> Tensor:
            idx = torch.randint(0, n, (min(opts.batch_size, n),), generator=gen)
            return block_loss(block.module(inputs.get(idx)), targets.get(idx))

        try:
            with torch.enable_grad():
                losses = _train_steps(learn, opts, opts.block_iters, loss_fn, f"distilling {block.name}",
                                      cfg.progress)
        finally:
            learn.commit()
            restore_grad(saved)
            inputs.close()
            targets.close()
        report.append({"stage": "block", "block": block.name, **losses})
    return report


def joint_stage(qmodel: nn.Module, teacher: nn.Module, calib: Tensor, cfg: QuantConfig,
                opts: DistillOptions, gen: torch.Generator) -> dict:
    """Stage (b): the whole student fits the teacher's softened logits."""
    device = torch.device(cfg.device)
    learn = _Learnable(quant_layers(qmodel))
    saved = train_only(qmodel, learn.weights + learn.scales)
    kd = distillation_loss(teacher, 1.0, opts.temperature)
    n = len(calib)

    def loss_fn(_step: int) -> Tensor:
        idx = torch.randint(0, n, (min(opts.batch_size, n),), generator=gen)
        x = calib[idx].to(device)
        if opts.augment:
            x = augment_batch(x, gen)
        logits = qmodel(x.clone())  # the teacher gets x as it was, whatever the model does in place
        with quantizers_disabled(teacher):  # the teacher is the FP network
            return kd(logits, x, None)

    try:
        with torch.enable_grad():
            losses = _train_steps(learn, opts, opts.joint_iters, loss_fn, "joint distillation", cfg.progress)
    finally:
        learn.commit()
        restore_grad(saved)
    return {"stage": "joint", **losses}


@register_method("distill", DistillOptions,
                 description="two-stage distillation with limited data: block-wise, then joint (Yuan et al.)")
def distill(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: DistillOptions,
            init: MseOptions = MseOptions()) -> None:
    teacher = mse_start_with_teacher(qmodel, calib, cfg, init)
    gen = generator(cfg.seed)
    was_training = qmodel.training
    qmodel.eval()  # BN (if unfolded) and dropout keep inference behaviour while the weights learn
    report = []
    if opts.block_iters:
        report += block_stage(qmodel, teacher, calib, cfg, opts, gen)
    if opts.joint_iters:
        report.append(joint_stage(qmodel, teacher, calib, cfg, opts, gen))
    qmodel.train(was_training)
    record_of(qmodel).reconstruction = report
