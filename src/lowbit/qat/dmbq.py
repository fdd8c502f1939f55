"""DMBQ (+ LBA) QAT: multi-bit weights and inputs ``sum_i alpha_i b_i`` with table-chosen alphas.

Zhao, Yue, Hu, "Distribution-aware Adaptive Multi-bit Quantization" (CVPR 2021, seed 002).

* Body layers at 1 to 4 bits: weights per output channel with ``b in {-1, 1}``; inputs per tensor
  with ``b in {0, 1}`` when the calibration inputs are non-negative (after ReLU: 0 stays a level)
  and ``{-1, 1}`` otherwise (``quant.dmbq_quantizers``). Alphas from the shipped table
  (``solver="table"``), a per-tensor fit (``"solve"``), LQ-Net's one step per iteration
  (``"lqnet"``), or by default (``"auto"``) the table up to 2 bases and LQ-Net's step above. The configured granularity does not apply: DMBQ weights are per channel.
* Layers above 4 bits (the protocol's 8-bit first and last layers) train with LSQ step sizes.
* BN stays in the network while it trains (as in LSQ); ``finalize`` folds it into the alphas.
* ``lba="channel" | "layer" | "global"`` turns the weight bits into a budget (``w_bits`` may then
  be fractional, e.g. 1.5 or 0.7) that ``qat.lba`` reallocates during training; inputs keep
  ``a_bits``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal

from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..options import Range
from ..ptq.start import MseOptions
from ..ptq.common import observe_fp_inputs
from ..quant import dmbq
from ..quant.declare import multibit_input, multibit_weight, settled_input
from ..quant.dmbq_quantizers import DmbqWeight
from ..quant.layer_specs import training_input_quantizer, training_weight_quantizer
from ..quant.layers import quant_layers
from ..quant.ranges import lp_search_range
from ..quant.learnable import commit_stand_ins
from ..record import record_of
from .bn import align_bn_signs, fold_steps_into_bn
from .lba import LbaState
from .registry import register_qat_method


MSE = MseOptions()  # the start point of the layers above 4 bits


@dataclass(frozen=True)
class DmbqOptions:
    """Attributes:
        solver: how the alphas are chosen at every step: "table" (DMBQ's offline table, looked
            up from the tensor's shape statistics), "solve" (alternating fit to convergence on
            the tensor), "lqnet" (one alternating step from the previous alphas) or "auto" (the
            default: the table for tensors and channels of up to 2 bases, LQ-Net's step from 3).
            On ResNet-20 (2000 images, 2 epochs, 2 seeds, benchmarks/RESULTS.md dmbq-qat-solvers,
            dmbq-qat-bits) the table led at W2/A2 (91.00 top-1 against 90.55 for both others) and
            LQ-Net's step at W3/A3 (92.80 against 92.15 for the table); both cost the same per step,
            "solve" about 2.5x more.
        act_momentum: moving-average momentum of the input alphas.
        lba: bit allocation during training: "channel" (CP), "layer" (LP), "global" (GP), or
            None (every body layer at ``w_bits``).
        lba_every: training steps between two reallocations.
        lba_fraction: share of the units that may gain a bit at one reallocation (at least one):
            with CP's thousands of channels one move per reallocation barely changes anything.
        lba_score: "error" (the paper's ``|(x - x_hat)^T g| / n`` ranks givers and takers alike) or
            "move" (``|(x_hat' - x_hat)^T g| / n`` of the move itself: one base more for a taker,
            one less, down to pruning, for a giver).
        max_bits: most bits LBA gives a unit.
        w_budget: average weight bits of the body layers under LBA (set from a fractional
            ``w_bits``; None: ``w_bits``).
    """

    solver: Literal["auto", "table", "solve", "lqnet"] = "auto"
    act_momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    lba: Literal["channel", "layer", "global"] | None = None
    lba_every: Annotated[int, Range(ge=1)] = 20
    lba_fraction: Annotated[float, Range(ge=0, le=1)] = 0.0
    lba_score: Literal["error", "move"] = "error"
    max_bits: Annotated[int, Range(ge=1, le=dmbq.MAX_BASES)] = dmbq.MAX_BASES
    w_budget: Annotated[float, Range(gt=0, le=dmbq.MAX_BASES)] | None = None

    def __post_init__(self) -> None:
        if self.w_budget is not None and self.lba is None and self.w_budget != int(self.w_budget):
            raise LowbitError(f"dmbq: fractional weight bits ({self.w_budget}) need lba='channel' or 'layer'")


def dmbq_setup(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: DmbqOptions) -> None:
    record = record_of(qmodel)
    align_bn_signs(qmodel, record.bn_pairs)
    observers = observe_fp_inputs(qmodel, calib, cfg)  # input signs and alphas, 8-bit start points
    managed: list[tuple[nn.Module, DmbqWeight]] = []
    # each declared part up to 4 bits becomes a multi-bit code book with as many bases; wider ones (the
    # protocol's 8-bit layers) keep their uniform one and learn its steps; all built from the declaration
    for name, layer in quant_layers(qmodel):
        spec = record.declaration(name)
        weight, inp = spec.weight, spec.input
        wq = layer.weight_quant
        if weight is not None:
            if weight.bits <= dmbq.MAX_BASES:
                weight = multibit_weight(weight)
                layer.weight_quant = training_weight_quantizer(weight, wq, solver=opts.solver)
                managed.append((layer, layer.weight_quant))
            else:  # LSQ from the MSE clipping start point (as method "lsq")
                wq.calibrate(layer.weight, lp_search_range, p=MSE.p_weight, candidates=MSE.candidates,
                             shrink=MSE.shrink)
                layer.weight_quant = training_weight_quantizer(weight, wq, weight=layer.weight)
        aq = layer.input_quant
        if inp is not None:
            values = observers[name].values()
            if inp.bits <= dmbq.MAX_BASES:
                inp = multibit_input(inp, bool(values.min() < 0))
                act = training_input_quantizer(inp, aq, solver=opts.solver, momentum=opts.act_momentum)
                act.start(values)
                layer.input_quant = act
            else:
                aq.calibrate(values, lp_search_range, p=MSE.p_act, candidates=MSE.candidates, shrink=MSE.shrink)
                inp = settled_input(inp, aq.signed)
                layer.input_quant = training_input_quantizer(inp, aq, lsq_grad_scale=True)
        record.declared[name] = replace(spec, weight=weight, input=inp)
    for layer, q in managed:  # alphas for the start point (and for LBA's first error estimates)
        q.update_alphas(q.rows(layer.weight.detach()))
    if opts.lba is not None:
        budget = opts.w_budget if opts.w_budget is not None else float(cfg.w_bits)
        if budget > opts.max_bits:
            raise LowbitError(f"dmbq: the weight budget {budget} exceeds max_bits={opts.max_bits}")
        state = LbaState(managed, opts.lba, budget, opts.lba_every, opts.max_bits, opts.lba_fraction,
                         opts.lba_score)
        # a child module, not record state: its clock and moves buffers go into the training
        # checkpoints with the model's state_dict, so a resumed run reallocates on the same steps
        qmodel.lowbit_lba = state
        state.start(qmodel)


def dmbq_finalize(qmodel: nn.Module, cfg: QuantConfig, opts: DmbqOptions) -> QuantConfig:
    record = record_of(qmodel)
    state = getattr(qmodel, "lowbit_lba", None)
    if isinstance(state, LbaState):
        state.stop(qmodel)
        record.lba_moves = int(state.moves)
        del qmodel.lowbit_lba
    commit_stand_ins(layer for _, layer in quant_layers(qmodel))
    fold_steps_into_bn(qmodel, record.bn_pairs, cfg)
    return cfg.with_(fold_bn=True, granularity="channel", groups=None)


register_qat_method("dmbq", dmbq_setup, dmbq_finalize, DmbqOptions,
                    "distribution-aware multi-bit quantization (DMBQ) with optional loss-guided bit "
                    "allocation (LBA)", fold_bn=False, fractional_bits=True)
