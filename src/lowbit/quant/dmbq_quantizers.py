"""DMBQ quantizer modules: per-output-channel weights (any mix of 0..4 bases) and per-tensor inputs.

Forward pass: the alphas come from the shipped table (``solver="table"``, DMBQ's way), from an
alternating fit to convergence on the tensor itself (``"solve"``), or from one alternating step
from the previous alphas (``"lqnet"``, LQ-Net's per-iteration update); ``"auto"`` (the default)
takes the table up to 2 bases and LQ-Net's step from 3 on, where the two-statistic table fits real
weight rows worse (see ``AUTO_TABLE_MAX_BASES``); then every element takes its nearest level. Gradient (straight-through): identity for elements between the lowest and
the highest level, zero beyond them (an element already clipped gains nothing from moving
further out). A channel with 0 bases is pruned: its weights quantize to 0 and cost nothing.

After training, ``commit`` freezes the alphas (``frozen``): the quantizer then maps any tensor to
the nearest of its stored levels, and the baked weights reproduce themselves exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import LowbitError
from . import dmbq
from .dmbq_table import table_alphas
from .quantizer import ActQuantizer, WeightQuantizer, spec_tensor
from .spec import TensorSpec

SOLVERS = ("auto", "table", "solve", "lqnet")
# "auto": the table up to this many bases, LQ-Net's step above. On the zoo ResNet-20's conv weight rows
# the table's MSE is 1.05x the per-row optimum at 2 bases but 1.19x at 3 and 1.43x at 4 (mean over
# layers); in QAT (2000 images, 2 epochs, benchmarks/RESULTS.md dmbq-qat-solvers and dmbq-qat-bits)
# the table led at 2/2 (91.00 vs 90.55, 2 seeds) and LQ-Net's step at 3/3 (92.80 vs 92.15, 2 seeds).
AUTO_TABLE_MAX_BASES = 2
SOLVE_SAMPLES = 1 << 16  # "solve" on activations fits on at most this many (evenly strided) elements


def solve_alphas(x: Tensor, m: int, signed: bool, solver: str, previous: Tensor | None = None) -> Tensor:
    """``(R, m)`` alphas for the rows of ``x`` by ``solver`` (see the module docstring), detached.

    ``previous`` (``(R, m)``, canonical) is the start point of "lqnet"; rows whose previous alphas
    are all zero (never set) start from the table.
    """
    if solver == "auto":
        solver = "table" if m <= AUTO_TABLE_MAX_BASES else "lqnet"
    with torch.no_grad():
        x = x.detach()
        if solver == "table":
            return table_alphas(x, m, signed)
        if x.shape[1] > SOLVE_SAMPLES:  # an activation tensor: fit on a strided subsample
            x = x[:, :: -(-x.shape[1] // SOLVE_SAMPLES)]
        start = table_alphas(x, m, signed)
        if solver == "solve":
            return dmbq.fit_alphas(x.double(), m, signed, init=start.double(), max_iters=100, tol=1e-6).to(x.dtype)
        if solver == "lqnet":
            if previous is not None:
                start = torch.where((previous != 0).any(1, keepdim=True), previous.to(x.dtype), start)
            return dmbq.canonical(dmbq.alternate_step(x, None, start, signed), signed)
        raise LowbitError(f"DMBQ solver must be one of {SOLVERS}, got {solver!r}")


def quantize_rows(rows: Tensor, alpha: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Nearest-level values of ``rows`` and the straight-through mask (between the extreme levels)."""
    q, _ = dmbq.assign(rows, alpha.to(rows.dtype), signed)
    lv = dmbq.levels(alpha.to(rows.dtype), signed)
    inside = (rows >= lv.amin(1, keepdim=True)) & (rows <= lv.amax(1, keepdim=True))
    return q, inside


def ste(rows: Tensor, q: Tensor, inside: Tensor) -> Tensor:
    """``q`` in the forward pass; gradient to ``rows`` where ``inside``, none elsewhere."""
    return torch.where(inside, rows + (q - rows).detach(), q.detach())


def _check_solver_and_bits(solver: str, bits: int, min_bits: int, what: str) -> None:
    """Refuse an unknown solver or a width outside ``min_bits .. MAX_BASES`` (0 prunes weights only)."""
    if solver not in SOLVERS:
        raise LowbitError(f"DMBQ solver must be one of {SOLVERS}, got {solver!r}")
    if not min_bits <= bits <= dmbq.MAX_BASES:
        raise LowbitError(f"DMBQ {what} take {min_bits} to {dmbq.MAX_BASES} bits, got {bits}")


class DmbqWeight(nn.Module):
    """Per-output-channel DMBQ weight quantizer with its own number of bases per channel.

    Wraps the layer's ``WeightQuantizer`` (``quant``: channel axis and count, ``enabled``).
    Buffers: ``channel_bits`` (bases per channel, 0 = pruned), ``alpha`` (the channel's alphas,
    canonical, zero-padded to ``MAX_BASES``), ``score`` / ``layer_score`` (LBA sensitivities
    accumulated since the last reallocation).
    """

    CODE_BOOK = "multibit"  # the quant.spec kind that spec() returns

    def __init__(self, quant: WeightQuantizer, bits: int, solver: str = "auto") -> None:
        super().__init__()
        _check_solver_and_bits(solver, bits, 0, "weights")
        self.quant = quant
        self.solver = solver
        device = quant.scale.device
        self.register_buffer("channel_bits", torch.full((quant.channels,), bits, dtype=torch.int64, device=device))
        self.register_buffer("alpha", torch.zeros(quant.channels, dmbq.MAX_BASES, device=device))
        self.register_buffer("score", torch.zeros(quant.channels, dtype=torch.float64, device=device))
        self.register_buffer("layer_score", torch.zeros((), dtype=torch.float64, device=device))
        # LBA "move" scores: first-order loss change of one bit more (up) or less (down), per channel
        # and for the layer; filled only when ``track_moves`` is on
        self.register_buffer("score_up", torch.zeros(quant.channels, dtype=torch.float64, device=device))
        self.register_buffer("score_down", torch.zeros(quant.channels, dtype=torch.float64, device=device))
        self.register_buffer("layer_up", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("layer_down", torch.zeros((), dtype=torch.float64, device=device))
        self.track = False  # accumulate LBA sensitivities in the backward pass
        self.track_moves = False  # and the up/down move scores
        self.frozen = False  # use the stored alphas (after commit)

    # --- what the rest of lowbit reads from a weight quantizer ---------------------------------
    @property
    def enabled(self) -> bool:
        return self.quant.enabled

    @property
    def channels(self) -> int:
        return self.quant.channels

    @property
    def axis(self) -> int:
        return self.quant.axis

    @property
    def bits(self) -> int:
        """The largest number of bases of any channel (the layer's storage width per plane count)."""
        return int(self.channel_bits.max())

    @property
    def mean_bits(self) -> float:
        return float(self.channel_bits.double().mean())

    @property
    def pruned_channels(self) -> int:
        return int((self.channel_bits == 0).sum())

    def rows(self, w: Tensor) -> Tensor:
        """``w`` as ``channels x n`` rows."""
        return (w.movedim(self.axis, 0) if self.axis else w).reshape(self.channels, -1)

    def unrows(self, rows: Tensor, like: Tensor) -> Tensor:
        moved = like.movedim(self.axis, 0) if self.axis else like
        out = rows.reshape(moved.shape)
        return out.movedim(0, self.axis) if self.axis else out

    @torch.no_grad()
    def update_alphas(self, rows: Tensor) -> None:
        """Recompute every channel's alphas from the current weights (not when frozen)."""
        for b in self.channel_bits.unique().tolist():
            if b == 0:
                continue
            sel = self.channel_bits == b
            prev = self.alpha[sel, :b]
            a = solve_alphas(rows[sel], b, True, self.solver, prev)
            new = torch.zeros(int(sel.sum()), dmbq.MAX_BASES, device=rows.device, dtype=self.alpha.dtype)
            new[:, :b] = a
            self.alpha[sel] = new

    def quantized_rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest-level values and straight-through mask of every channel (pruned: 0, mask all)."""
        q = torch.zeros_like(rows)
        inside = torch.ones_like(rows, dtype=torch.bool)
        for b in self.channel_bits.unique().tolist():
            if b == 0:
                continue
            sel = (self.channel_bits == b).nonzero().squeeze(1)
            qb, ib = quantize_rows(rows[sel], self.alpha[sel, :b], True)
            q[sel] = qb.to(q.dtype)
            inside[sel] = ib
        return q, inside

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        rows = self.rows(w)
        if not self.frozen:
            self.update_alphas(rows)
        q, inside = self.quantized_rows(rows.detach())
        out = ste(rows, q, inside)
        if self.track and self.training and out.requires_grad:
            err = (rows - q).detach()
            out.register_hook(lambda g, err=err: self._accumulate(err, g))
            if self.track_moves:
                r = rows.detach()
                up, down = self.shifted_rows(r, 1) - q, self.shifted_rows(r, -1) - q
                out.register_hook(lambda g, up=up, down=down: self._accumulate_moves(up, down, g))
        return self.unrows(out, w)

    @torch.no_grad()
    def shifted_rows(self, rows: Tensor, delta: int) -> Tensor:
        """Every channel quantized at its width + ``delta`` bases (table alphas; 0 bases: zeros).

        A channel whose shifted width falls outside ``0..MAX_BASES`` keeps its current values.
        """
        q, _ = self.quantized_rows(rows)
        for b in self.channel_bits.unique().tolist():
            nb = b + delta
            if not 0 <= nb <= dmbq.MAX_BASES:
                continue
            sel = (self.channel_bits == b).nonzero().squeeze(1)
            if nb == 0:
                q[sel] = 0
                continue
            alpha = table_alphas(rows[sel], nb, True)
            q[sel] = dmbq.assign(rows[sel], alpha.to(rows.dtype), True)[0].to(q.dtype)
        return q

    @torch.no_grad()
    def _accumulate_moves(self, up: Tensor, down: Tensor, grad: Tensor) -> None:
        """LBA "move" scores: ``|(x_hat' - x_hat)^T g| / n`` for one base more and one less."""
        g = grad.double()
        for diff, per, layer in ((up, self.score_up, self.layer_up), (down, self.score_down, self.layer_down)):
            dot = (diff.double() * g).sum(1)
            per += dot.abs() / diff.shape[1]
            layer += dot.sum().abs() / diff.numel()

    @torch.no_grad()
    def _accumulate(self, err: Tensor, grad: Tensor) -> None:
        """LBA: add ``|(x - x_hat)^T g(x_hat)| / n`` per channel and for the whole layer."""
        dot = (err.double() * grad.double()).sum(1)
        self.score += dot.abs() / err.shape[1]
        self.layer_score += dot.sum().abs() / err.numel()

    @torch.no_grad()
    def commit(self, layer: nn.Module) -> "DmbqWeight":
        """Freeze the alphas and write the quantized weights into ``layer.weight`` (exact levels)."""
        self.track = False
        rows = self.rows(layer.weight)
        if not self.frozen:
            self.update_alphas(rows)
        q, _ = self.quantized_rows(rows)
        layer.weight.copy_(self.unrows(q, layer.weight))
        self.frozen = True
        self.track_moves = False
        for b in (self.score, self.layer_score, self.score_up, self.score_down, self.layer_up, self.layer_down):
            b.zero_()
        return self

    @torch.no_grad()
    def fold_multiplier(self, layer: nn.Module, mult: Tensor) -> None:
        """Fold a per-output-channel BN multiplier: ``|mult|`` into the alphas, its sign into the planes.

        Exact: ``mult * sum_i alpha_i b_i = sum_i (|mult| alpha_i) (sign(mult) b_i)``. Called by
        ``qat.bn.fold_steps_into_bn`` on committed quantizers.
        """
        from .layers import per_output_channel

        if not self.frozen:
            raise LowbitError("DMBQ: commit the quantizer before folding BN into it")
        mult = mult.to(self.alpha.dtype)
        layer.weight.mul_(per_output_channel(layer, mult.to(layer.weight.dtype)))
        per_axis = mult.view(-1, self.channels)  # ConvTranspose groups: one axis channel, several outputs
        if per_axis.shape[0] != 1 and not torch.equal(per_axis.abs(), per_axis[:1].abs().expand_as(per_axis)):
            raise LowbitError("DMBQ: a BN multiplier must be shared by the conv groups of a ConvTranspose layer")
        self.alpha.mul_(per_axis[0].abs().unsqueeze(1))
        # the weights become the scaled levels exactly as this quantizer computes them (not
        # ``w * mult``, which may differ in the last bit), so they still reproduce themselves
        q, _ = self.quantized_rows(self.rows(layer.weight))
        layer.weight.copy_(self.unrows(q, layer.weight))

    def spec(self) -> TensorSpec:
        """This quantizer's code book: a binary basis per channel (0 bases: pruned); only once committed."""
        if not self.frozen:
            raise LowbitError("its DMBQ quantizer is still training (finish the QAT run)")
        bits = self.bits
        alphas = spec_tensor(self.alpha[:, :bits])
        # a channel's alphas beyond its own bases (left from a width LBA took away) play no part: 0, as stored
        alphas[torch.arange(bits) >= self.channel_bits.cpu().unsqueeze(1)] = 0
        return TensorSpec("multibit", bits, True, True, False, "channel", self.channels, self.channels, self.axis,
                          tuple(int(b) for b in self.channel_bits.tolist()), alphas=alphas)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, mean_bits={self.mean_bits:.3f}, pruned={self.pruned_channels}, "
                f"solver={self.solver}, frozen={self.frozen}")


class DmbqAct(nn.Module):
    """Per-tensor DMBQ input quantizer: ``b in {0, 1}`` after ReLU (``signed=False``), ``{-1, 1}`` otherwise.

    Training updates a moving average of the alphas (``momentum``) from every batch and quantizes
    with the average, as evaluation does; ``start`` sets it from calibration data first.
    """

    CODE_BOOK = "multibit"  # the quant.spec kind that spec() returns

    def __init__(self, quant: ActQuantizer, bits: int, signed: bool, solver: str = "auto",
                 momentum: float = 0.9) -> None:
        super().__init__()
        _check_solver_and_bits(solver, bits, 1, "activations")
        self.quant = quant
        self.num_bases = bits
        self.signed = signed
        self.solver = solver
        self.momentum = momentum
        self.frozen = False
        device = quant.scale.device
        self.register_buffer("alpha", torch.zeros(1, bits, device=device))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))

    @property
    def enabled(self) -> bool:
        return self.quant.enabled

    @property
    def bits(self) -> int:
        return self.num_bases

    @torch.no_grad()
    def start(self, values: Tensor) -> None:
        """Alphas from sampled calibration ``values``."""
        self.alpha.copy_(solve_alphas(values.reshape(1, -1).float().to(self.alpha.device), self.num_bases,
                                      self.signed, self.solver))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        rows = x.reshape(1, -1)
        if self.training and not self.frozen:
            with torch.no_grad():
                a = solve_alphas(rows, self.num_bases, self.signed, self.solver, self.alpha)
                if not bool(self.initialized):
                    self.alpha.copy_(a)
                    self.initialized.fill_(True)
                else:
                    self.alpha.mul_(self.momentum).add_((1 - self.momentum) * a.to(self.alpha.dtype))
        q, inside = quantize_rows(rows.detach(), self.alpha, self.signed)
        return ste(rows, q, inside).view_as(x)

    @torch.no_grad()
    def commit(self) -> "DmbqAct":
        self.frozen = True
        return self

    def spec(self) -> TensorSpec:
        """This quantizer's code book: one binary basis for the whole tensor."""
        return TensorSpec("multibit", self.num_bases, self.signed, alphas=spec_tensor(self.alpha))

    def extra_repr(self) -> str:
        return f"bits={self.num_bases}, signed={self.signed}, solver={self.solver}, frozen={self.frozen}"
