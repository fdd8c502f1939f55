"""Block reconstruction PTQ: learned rounding per block (BRECQ) with optional QDrop.

Starting from the MSE-clipping baseline, each block of the quantized network is fitted to the
floating-point network's block output, block after block, on the quantized network's own
inputs (so earlier errors are compensated). What is learned: the rounding direction of every
weight (AdaRound's soft rounding, annealed to hard 0/1 decisions) and the step size of every
activation quantizer inside the block (LSQ), jointly, as in the QDrop code (wimh966/QDrop).

QDrop (``drop_prob=0.5``, the ``qdrop`` method) follows the official code: each step, the
block's input is, element by element, the floating-point network's block input with
probability ``drop_prob`` and the quantized network's (quantized) block input otherwise; every
activation quantizer inside the block likewise keeps each element unquantized with that
probability. Nothing is dropped at evaluation: the learned quantizers are committed as plain
ones. ``brecq`` is the same fit without dropping, on the quantized network's block inputs (the
BRECQ baseline of the QDrop code; yhhhli/BRECQ itself fits the rounding with activations in float
first, then the activation steps alone).

The weight grid starts from an Lp (p = 2.4) clipping search, as both official codes do; qdrop
searches clip width and integer zero point jointly (QDrop's MSE observer), brecq shrinks the
min/max range (BRECQ's). Both default to asymmetric weights (unsigned codes with a zero point,
``w_symmetric=False``), the grid of both official codes: four levels at 2 bits, where lowbit's
symmetric narrow default would be ternary. ``w_symmetric=True`` (or ``config=``) overrides it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..options import Range
from ..progress import progress_bar
from ..quant.learnable import LearnedStepAct, SoftRoundWeight, commit_stand_ins
from ..record import record_of
from .start import MseOptions, mse_start_with_teacher
from .blocks import Block, capture_block_io, find_blocks, loss_summary
from .common import generator, quantizers_disabled, restore_grad, train_only
from .registry import register_method


@dataclass(frozen=True)
class ReconOptions:
    """Options of block reconstruction.

    Attributes:
        iters: optimisation steps per block (the published BRECQ/QDrop setting is 20000; see
            benchmarks/RESULTS.md, section recon-anchors, for what fewer give on the zoo models).
        batch_size: images per step.
        lr: Adam learning rate of the rounding variables.
        act_lr: Adam learning rate of activation step sizes (cosine-annealed); 0 keeps them fixed.
        reg_weight: weight of the rounding regulariser (lambda).
        beta_start: initial sharpness exponent of the regulariser.
        beta_end: final sharpness exponent.
        warmup: fraction of steps without the regulariser.
        drop_prob: QDrop probability of keeping an activation unquantized during the fit (and of
            taking the FP network's value at the block input).
        max_block_layers: larger modules are split into smaller blocks.
        cache_mb: in-memory budget per cached tensor; larger caches go to a temporary file.
    """

    iters: Annotated[int, Range(ge=1)] = 500
    batch_size: Annotated[int, Range(ge=1)] = 32
    lr: Annotated[float, Range(gt=0)] = 1e-3
    act_lr: Annotated[float, Range(ge=0)] = 4e-5
    reg_weight: Annotated[float, Range(ge=0)] = 0.01
    beta_start: Annotated[float, Range(gt=0)] = 20.0  # >= beta_end
    beta_end: Annotated[float, Range(gt=0)] = 2.0
    warmup: Annotated[float, Range(ge=0, lt=1)] = 0.2
    drop_prob: Annotated[float, Range(ge=0, lt=1)] = 0.0
    max_block_layers: Annotated[int, Range(ge=1)] = 8
    cache_mb: Annotated[int, Range(ge=0)] = 1024

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1:
            raise LowbitError("reconstruction iters and batch_size must be >= 1")
        if self.lr <= 0 or self.act_lr < 0 or self.reg_weight < 0:
            raise LowbitError("reconstruction lr must be > 0, act_lr and reg_weight >= 0")
        if not 0 <= self.warmup < 1 or not 0 <= self.drop_prob < 1:
            raise LowbitError("reconstruction warmup and drop_prob must be in [0, 1)")
        if self.beta_start < self.beta_end or self.beta_end <= 0:
            raise LowbitError("reconstruction needs beta_start >= beta_end > 0")


@dataclass(frozen=True)
class QDropOptions(ReconOptions):
    """Block reconstruction with QDrop (activation quantization dropped with ``drop_prob``)."""

    drop_prob: Annotated[float, Range(ge=0, lt=1)] = 0.5


def block_loss(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels, averaged over batch and positions (BRECQ's ``lp_loss``)."""
    diff = (out - target).pow(2)
    return diff.sum(1).mean() if diff.dim() > 1 else diff.mean()


def beta_at(step: int, opts: ReconOptions) -> float | None:
    """Regulariser exponent at ``step`` (None during warm-up): linear decay after warm-up."""
    start = opts.warmup * opts.iters
    if step < start:
        return None
    t = (step - start) / max(1.0, opts.iters - start)
    return opts.beta_end + (opts.beta_start - opts.beta_end) * max(0.0, 1.0 - t)


# Initial grids (Lp clipping with p = 2.4 on weights and activations, as in both official codes)
BRECQ_INIT = MseOptions(p_weight=2.4)
QDROP_INIT = MseOptions(p_weight=2.4, zero_point_search=True)


def mix_inputs(quant: Tensor, fp: Tensor, prob: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """QDrop's block input: ``fp`` where a uniform draw is below ``prob``, else ``quant``; and that mask."""
    keep_fp = torch.rand(quant.shape, generator=generator, device=quant.device, dtype=quant.dtype) < prob
    return torch.where(keep_fp, fp, quant), keep_fp


@torch.no_grad()
def block_input_layers(block: Block, example: Tensor) -> list[nn.Module]:
    """The block's quantized layers whose input is the block's input, value for value.

    Their input quantizers quantize the block input, so QDrop's mask of FP elements applies to
    them. Found by comparing values in one forward pass (not by identity: a block that rewrites
    its input in place, ``x.mul_(2)``, feeds its layers other values through the same tensor);
    a layer fed anything else draws masks of its own.
    """
    x = example.clone()  # the block may change its input in place
    ref = x.clone()
    found: list[nn.Module] = []

    def pre_hook(module, args):
        if args and isinstance(args[0], Tensor) and args[0].shape == ref.shape and torch.equal(args[0], ref):
            found.append(module)

    handles = [layer.register_forward_pre_hook(pre_hook) for _, layer in block.layers]
    try:
        block.module(x)
    finally:
        for h in handles:
            h.remove()
    return found


def _swap_in(block: Block, opts: ReconOptions, drop_gen: torch.Generator | None) -> tuple[list, list]:
    rounders, acts = [], []
    for _, layer in block.layers:
        wq = layer.weight_quant
        if wq.enabled and not wq.binary:
            layer.weight_quant = SoftRoundWeight(wq, layer.weight)
            rounders.append((layer, layer.weight_quant))
        if layer.input_quant.enabled and (opts.act_lr > 0 or opts.drop_prob > 0):
            layer.input_quant = LearnedStepAct(layer.input_quant, opts.drop_prob, generator=drop_gen)
            acts.append((layer, layer.input_quant))
    return rounders, acts


def reconstruct_block(block: Block, inputs, targets, opts: ReconOptions, gen: torch.Generator,
                      progress: bool | None = None, drop_gen: torch.Generator | None = None,
                      fp_inputs=None) -> dict[str, float]:
    """Fit one block's rounding and activation steps to ``targets``; returns first/last loss.

    ``gen`` (CPU) picks the batches; ``drop_gen`` (on the activations' device) draws the QDrop masks.
    ``fp_inputs`` (the FP network's block inputs, with ``drop_prob`` > 0) are mixed into the
    quantized network's ``inputs`` element-wise (QDrop).
    """
    mixing = fp_inputs is not None and opts.drop_prob > 0
    entry = {id(m) for m in block_input_layers(block, inputs.get(torch.arange(min(2, len(inputs)))))} if mixing else set()
    rounders, acts = _swap_in(block, opts, drop_gen)
    entry_acts = [a for layer, a in acts if id(layer) in entry and a.dropping]
    saved = train_only(block.module, [r.v for _, r in rounders] + [a.scale for _, a in acts if opts.act_lr > 0])
    groups = []
    if rounders:
        groups.append(torch.optim.Adam([r.v for _, r in rounders], lr=opts.lr))
    act_params = [a.scale for _, a in acts if opts.act_lr > 0]
    scheds = []
    if act_params:
        a_opt = torch.optim.Adam(act_params, lr=opts.act_lr)
        groups.append(a_opt)
        scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=opts.iters, eta_min=0.0))
    was_training = block.module.training
    block.module.eval()  # dropout/BN keep inference behaviour; only QDrop is stochastic
    for _, a in acts:
        a.train()
    history: list[float] = []
    try:
        if groups:
            n = len(inputs)
            bar = progress_bar(range(opts.iters), desc=f"reconstructing {block.name}", enable=progress)
            for step in bar:
                idx = torch.randint(0, n, (min(opts.batch_size, n),), generator=gen)
                x = inputs.get(idx)
                if mixing:
                    x, keep_fp = mix_inputs(x, fp_inputs.get(idx), opts.drop_prob, drop_gen)
                    for a in entry_acts:  # FP elements of the block input stay FP through its quantizers
                        a.shared_keep = keep_fp
                out = block.module(x)
                rec = block_loss(out, targets.get(idx))
                loss = rec
                beta = beta_at(step, opts)
                if beta is not None and rounders and opts.reg_weight > 0:
                    loss = loss + opts.reg_weight * sum(r.regularizer(beta) for _, r in rounders)
                for opt in groups:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in groups:
                    opt.step()
                for s in scheds:
                    s.step()
                history.append(rec.item())
                if step % 50 == 0:
                    bar.set_postfix(rec=f"{history[-1]:.4g}")
    finally:
        for a in entry_acts:
            a.shared_keep = None
        commit_stand_ins(layer for _, layer in block.layers)
        restore_grad(saved)
        block.module.train(was_training)
    return loss_summary(history)


def reconstruct(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: ReconOptions,
                init: MseOptions = BRECQ_INIT) -> list[dict]:
    """Block-by-block reconstruction of ``qmodel`` in place; returns per-block losses."""
    teacher = mse_start_with_teacher(qmodel, calib, cfg, init)
    device = torch.device(cfg.device)
    blocks = find_blocks(qmodel, calib[:2].to(device), opts.max_block_layers)
    teacher_modules = dict(teacher.named_modules())
    limit = opts.cache_mb * 2 ** 20
    gen = generator(cfg.seed)
    # QDrop masks on the activations' device; seeded like the global RNG was before, so results
    # of earlier versions (which drew the masks from it after torch.manual_seed(seed)) still hold
    drop_gen = generator(cfg.seed, device) if opts.drop_prob > 0 else None
    report = []
    was_training = qmodel.training
    qmodel.eval()
    with quantizers_disabled(teacher):
        for block in progress_bar(blocks, desc="blocks", enable=cfg.progress if len(blocks) > 1 else False):
            inputs, _ = capture_block_io(qmodel, block.module, calib, cfg.batch_size, limit, device,
                                         want_output=False)
            # QDrop mixes the FP network's block inputs in: captured in the same pass as the targets
            fp_inputs, targets = capture_block_io(teacher, teacher_modules[block.name], calib, cfg.batch_size,
                                                  limit, device, want_input=opts.drop_prob > 0)
            with torch.enable_grad():
                losses = reconstruct_block(block, inputs, targets, opts, gen, progress=cfg.progress,
                                           drop_gen=drop_gen, fp_inputs=fp_inputs)
            report.append({"block": block.name, "layers": len(block.layers), **losses})
            for cache in (inputs, targets, fp_inputs):
                if cache is not None:
                    cache.close()
    qmodel.train(was_training)
    return report


# Both official codes quantize weights with unsigned codes and a zero point (four levels at 2 bits)
PUBLISHED_GRID = {"w_symmetric": False}


@register_method("brecq", ReconOptions, config_defaults=PUBLISHED_GRID,
                 description="block reconstruction: learned rounding + activation steps per block (BRECQ)")
def brecq(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: ReconOptions) -> None:
    record_of(qmodel).reconstruction = reconstruct(qmodel, calib, cfg, opts)


@register_method("qdrop", QDropOptions, config_defaults=PUBLISHED_GRID,
                 description="block reconstruction with random activation-quantization dropping (QDrop)")
def qdrop(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: QDropOptions) -> None:
    record_of(qmodel).reconstruction = reconstruct(qmodel, calib, cfg, opts, init=QDROP_INIT)

