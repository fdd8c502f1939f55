"""LBA: loss-guided bit allocation during QAT (seed 002), over DMBQ weight quantizers.

Sensitivity of a unit (an output channel, a layer): ``|(x - x_hat)^T g(x_hat)| / n``, the
first-order change of the loss if the unit's quantization error were removed, summed over the
backward passes since the last reallocation (``DmbqWeight`` accumulates it in a tensor hook).
Every ``every`` training steps the most sensitive units that can grow (``fraction`` of the
units, at least one) gain one bit each and the least sensitive units (one bit each, least
sensitive first) give up enough bits that the parameter-weighted average stays within the
budget; 0 bits prunes a channel (a layer keeps at least 1 bit: at 0 it would vanish). A move
that no set of donors can pay for is skipped, so the true average never exceeds the budget.

Granularity (``mode``): "channel" (CP: every output channel of every body layer is a unit),
"layer" (LP: every layer), "global" (GP: the whole network shares one width, so nothing moves;
the budget must be a whole number of bits).

The clock (training forwards seen), the per-unit bits and the sensitivities are buffers of the
model, so a checkpoint resumes the allocation exactly.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor, nn

from ..errors import LowbitError
from ..quant import dmbq
from ..quant.dmbq_quantizers import DmbqWeight
from ..quant.dmbq_table import table_alphas

MODES = ("channel", "layer", "global")
SCORES = ("error", "move")  # the paper's |(x - x_hat)^T g| / n, or the loss change of the move itself


def _units_error(quant: DmbqWeight, weight: Tensor, bits: int) -> Tensor:
    """Per-channel mean squared error of ``weight`` at ``bits`` bases (table alphas; 0 bits: E w^2)."""
    rows = quant.rows(weight.detach()).float()
    if bits == 0:
        return rows.pow(2).mean(1)
    alpha = table_alphas(rows, bits, True)
    return dmbq.weighted_mse(rows, None, alpha, True)


class LbaState(nn.Module):
    """The allocator: attached to the model as ``lowbit_lba`` and run by a forward pre-hook.

    Args:
        layers: ``(layer, quantizer)`` of every DMBQ weight quantizer that takes part.
        mode: "channel", "layer" or "global".
        budget: average bits per weight over those layers (parameter-weighted).
        every: training steps between reallocations.
        max_bits: most bases a unit may hold.
        fraction: share of the units that may gain a bit at one reallocation (at least one unit):
            CP has thousands of channels, so one move per reallocation would leave it at its
            initial allocation over any short schedule.
    """

    def __init__(self, layers: list[tuple[nn.Module, DmbqWeight]], mode: str, budget: float, every: int,
                 max_bits: int, fraction: float = 0.0, score: str = "error") -> None:
        super().__init__()
        if mode not in MODES:
            raise LowbitError(f"lba must be one of {MODES}, got {mode!r}")
        if not layers:
            raise LowbitError("lba: no layer has DMBQ weights to allocate bits to")
        if not 0 < budget <= max_bits:
            raise LowbitError(f"lba: the bit budget must be in (0, max_bits={max_bits}], got {budget}")
        if mode == "layer" and budget < 1:
            raise LowbitError(f"lba='layer' keeps every layer at 1 bit or more (0 bits would remove the whole "
                              f"layer): the budget must be at least 1, got {budget}; lba='channel' prunes channels")
        if mode == "global" and budget != int(budget):
            raise LowbitError(f"lba='global' gives every weight the same width: the budget must be a whole "
                              f"number of bits, got {budget}")
        self._layers = list(layers)  # plain list: the quantizers belong to their layers, not to this module
        self.mode = mode
        self.budget = Fraction(budget).limit_denominator(10 ** 6)
        self.every = every
        self.max_bits = max_bits
        if not 0 <= fraction <= 1:
            raise LowbitError(f"lba: the fraction of units moved per reallocation must be in [0, 1], got {fraction}")
        self.fraction = fraction
        if score not in SCORES:
            raise LowbitError(f"lba score must be one of {SCORES}, got {score!r}")
        self.score = score
        self.hook_id: int | None = None
        self.register_buffer("clock", torch.zeros((), dtype=torch.int64))
        self.register_buffer("moves", torch.zeros((), dtype=torch.int64))

    # --- accounting ---------------------------------------------------------------------------
    def _sizes(self) -> list[int]:
        return [q.rows(layer.weight).shape[1] for layer, q in self._layers]

    def total_bits(self) -> int:
        """Bits of every managed weight: ``sum_c n_c * bits_c``."""
        return sum(int(q.channel_bits.sum()) * n for (_, q), n in zip(self._layers, self._sizes()))

    def params(self) -> int:
        return sum(q.channels * n for (_, q), n in zip(self._layers, self._sizes()))

    def average_bits(self) -> float:
        return self.total_bits() / self.params()

    def cap(self) -> Fraction:
        return self.budget * self.params()

    def _units(self) -> list[tuple[int, int | None, int]]:
        """``(layer index, channel or None, size)`` of every unit."""
        out: list[tuple[int, int | None, int]] = []
        for i, ((_, q), n) in enumerate(zip(self._layers, self._sizes())):
            if self.mode == "channel":
                out += [(i, c, n) for c in range(q.channels)]
            else:
                out.append((i, None, n * q.channels))
        return out

    def _bits(self, unit: tuple[int, int | None, int]) -> int:
        q = self._layers[unit[0]][1]
        return int(q.channel_bits[unit[1]]) if unit[1] is not None else int(q.channel_bits.max())

    def _all_bits(self) -> list[int]:
        """Bits of every unit, in ``_units`` order."""
        if self.mode == "channel":
            return torch.cat([q.channel_bits for _, q in self._layers]).tolist()
        return [int(q.channel_bits.max()) for _, q in self._layers]

    def _set(self, unit: tuple[int, int | None, int], bits: int) -> None:
        q = self._layers[unit[0]][1]
        if unit[1] is None:
            q.channel_bits.fill_(bits)
        else:
            q.channel_bits[unit[1]] = bits

    # --- allocation -----------------------------------------------------------------------------
    @torch.no_grad()
    def initial_allocation(self) -> None:
        """Every unit at ``floor(budget)`` bits, then one more bit for the units of largest
        quantization error per weight while the budget allows (the whole budget when it is whole)."""
        base = min(math.floor(self.budget), self.max_bits)
        units = self._units()
        for u in units:
            self._set(u, base)
        slack = self.cap() - self.total_bits()
        if slack <= 0 or base >= self.max_bits:
            return
        errors = []
        for layer, q in self._layers:
            e = _units_error(q, layer.weight, base)
            errors.append(e if self.mode == "channel" else e.mean().reshape(1))
        flat = [float(errors[i][c if c is not None else 0]) for i, c, _ in units]
        for k in sorted(range(len(units)), key=lambda k: -flat[k]):
            size = units[k][2]
            if size <= slack:
                self._set(units[k], base + 1)
                slack -= size
        assert self.total_bits() <= self.cap()

    def _scores(self, kind: str = "score") -> list[float]:
        """Per-unit scores: ``kind`` "score" (the paper's), "up" or "down" (the move scores)."""
        names = {"score": ("score", "layer_score"), "up": ("score_up", "layer_up"),
                 "down": ("score_down", "layer_down")}[kind]
        scores: list[Tensor] = []
        for _, q in self._layers:
            scores.append(getattr(q, names[0]) if self.mode == "channel" else getattr(q, names[1]).reshape(1))
        flat = torch.cat([s.reshape(-1) for s in scores])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)  # every process decides on the same, global, sensitivities
        return flat.tolist()

    @torch.no_grad()
    def reallocate(self) -> bool:
        """Move bits to the most sensitive units that can grow, paid by the least sensitive ones.

        Up to ``moves_per_step`` units (``fraction`` of the units, at least one) gain one bit
        each, most sensitive first; every donor gives at most one bit and must be less sensitive
        than the unit it pays for. A receiver that no remaining donors can pay for ends the round.
        Returns whether anything moved. Sensitivities are reset either way.
        """
        moved = False
        if self.mode != "global":
            units = self._units()
            bits = self._all_bits()
            if self.score == "move":  # gain of one bit more against the loss of one bit less
                gain, cost = self._scores("up"), self._scores("down")
            else:
                gain = cost = self._scores()
            order = sorted(range(len(units)), key=lambda k: (-gain[k], k))
            receivers = [k for k in order if bits[k] < self.max_bits and gain[k] > 0][:self.moves_per_step()]
            taken = set(receivers)  # a unit gains or gives in one round, never both
            donor_pool = sorted((k for k in range(len(units)) if k not in taken and bits[k] > self.min_bits),
                                key=lambda k: (cost[k], -k))
            total = self.total_bits()
            cap = self.cap()
            for receiver in receivers:
                need = total + units[receiver][2]
                paid = []
                while need > cap and donor_pool and cost[donor_pool[0]] < gain[receiver]:
                    k = donor_pool.pop(0)
                    paid.append(k)
                    need -= units[k][2]
                if need > cap:  # the rest cannot be paid for: give the donors back, stop here
                    donor_pool[:0] = paid
                    break
                total = need
                self._set(units[receiver], bits[receiver] + 1)
                for k in paid:
                    self._set(units[k], bits[k] - 1)
                moved = True
                self.moves += 1
        for _, q in self._layers:
            for b in (q.score, q.layer_score, q.score_up, q.score_down, q.layer_up, q.layer_down):
                b.zero_()
        return moved

    @property
    def min_bits(self) -> int:
        """Fewest bits a unit may keep: 0 (pruned) for a channel, 1 for a layer.

        A layer at 0 bits outputs nothing: measured on ResNet-20 at a 1.0-bit budget, LP pruned a
        whole 64-channel conv and top-1 fell to 17.8% (GP 88.3%).
        """
        return 1 if self.mode == "layer" else 0

    def moves_per_step(self) -> int:
        """Units that may gain a bit at one reallocation: ``fraction`` of the units, at least one."""
        return max(1, round(self.fraction * len(self._units()))) if self.mode != "global" else 0

    def before_forward(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the model: count training steps, reallocate every ``every`` of them."""
        if not module.training:
            return
        clock = int(self.clock)
        if clock > 0 and clock % self.every == 0:
            self.reallocate()
        self.clock += 1

    def start(self, model: nn.Module) -> None:
        """Allocate within the budget, turn on the sensitivity hooks, and hook ``model``'s forward."""
        self.initial_allocation()
        for _, q in self._layers:
            q.track = True
            q.track_moves = self.score == "move"
        self.hook_id = model.register_forward_pre_hook(self.before_forward).id

    def stop(self, model: nn.Module) -> None:
        """Remove the hook and the sensitivity tracking (the bits stay)."""
        for _, q in self._layers:
            q.track = False
            q.track_moves = False
        if self.hook_id is not None:
            model._forward_pre_hooks.pop(self.hook_id, None)
            self.hook_id = None

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, budget={float(self.budget)}, every={self.every}, max_bits={self.max_bits}, "
                f"fraction={self.fraction}, score={self.score}")


def bit_map(qmodel: nn.Module) -> list[dict]:
    """Per layer with DMBQ weights: name, channels, mean bits, pruned channels, histogram of
    channel bits (``hist[b]`` = channels at ``b`` bits) and the per-channel bits themselves."""
    from ..quant.layers import quant_layers

    rows = []
    for name, layer in quant_layers(qmodel):
        wq = layer.weight_quant
        bits = getattr(wq, "channel_bits", None)
        if bits is None or not wq.enabled:
            continue
        b = bits.detach().cpu()
        rows.append({"layer": name, "channels": int(b.numel()), "mean_bits": float(b.double().mean()),
                     "pruned": int((b == 0).sum()),
                     "hist": [int((b == k).sum()) for k in range(dmbq.MAX_BASES + 1)], "bits": b.tolist()})
    return rows


def bit_map_markdown(rows: list[dict]) -> str:
    """The bit map as a markdown table (one row per layer, the channel histogram in columns)."""
    head = "| layer | channels | mean bits | " + " | ".join(f"{k} bit" for k in range(dmbq.MAX_BASES + 1)) + " |"
    lines = [head, "|" + "---|" * (3 + dmbq.MAX_BASES + 1)]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['channels']} | {r['mean_bits']:.3f} | "
                     + " | ".join(str(h) for h in r["hist"]) + " |")
    return "\n".join(lines)


def bit_map_png(rows: list[dict], path: str, title: str = "") -> None:
    """Heat map of the channel bits: one row per layer, channels along x (blank past a layer's width)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = max(r["channels"] for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, :r["channels"]] = r["bits"]
    fig = Figure(figsize=(10, 0.3 * len(rows) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=dmbq.MAX_BASES)
    ax.set_yticks(range(len(rows)), [r["layer"] for r in rows], fontsize=7)
    ax.set_xlabel("output channel")
    ax.set_title(title or "bits per output channel (0 = pruned)")
    fig.colorbar(im, ax=ax, label="bits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
