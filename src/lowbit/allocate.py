"""Mixed-precision bit allocation under a budget: a multiple-choice knapsack over (layer, bits).

Each layer picks one width from the candidates; the cost of a choice is its storage (weight
elements x bits, or bytes with the scales), the value its sensitivity (``lowbit.sensitivity``),
assumed additive over layers, as HAWQ-V3 and LBA do. Minimise the summed sensitivity subject to
the summed cost within the budget.

Solvers:
- ``"dp"`` (default): exact dynamic programming over a discretised budget. Each layer's costs are
  taken above its cheapest choice, and the slack ``S = B - sum of the cheapest costs`` (``B`` the
  budget) is split into units of ``u = max(1, ceil(S / resolution))``; costs are rounded *up* to
  whole units, so every map the DP returns is truly within the budget (and the cheapest map is
  always found when it fits). Optimality gap: any map of true cost at most ``B - L * u`` (``L``
  free layers) is feasible for the DP, so the DP's total sensitivity is at most the exact optimum
  under the budget ``B - L * u``; with ``u = 1`` (a slack up to ``resolution`` units) it is the
  exact optimum. For an average-bit budget the tightening is ``L * u / P`` bits on average
  (``P`` weight elements), at most ``L * (avg - min width) / resolution``: e.g. under 0.0009
  bits for 22 layers at 3.0 bits from 1-bit candidates with the default resolution of 50 000.
- ``"greedy"``: marginal-gain ascent (start every layer at its narrowest width, repeatedly apply
  the upgrade with the largest sensitivity decrease per unit of cost that still fits). No
  optimality guarantee; the tests compare it with the DP.

Per channel (``granularity="channel"``) every output channel of every free layer is an item, with
the Taylor scores of ``sensitivity(per_channel=True)`` as values and 0 (pruning) among the
choices. Thousands of items make the DP's discretisation gap (``L * u``) useless, so channels are
solved by the convex-hull greedy of the multiple-choice knapsack (``solve_hull``): each item keeps
the lower convex hull of its (cost, value) points, all hull steps are applied in order of falling
value per cost while they fit. Its total is at most the LP relaxation's optimum plus the value
gain of the first step that did not fit (the stated gap; returned by ``solve_hull``). Every layer
keeps at least one channel unpruned (its most sensitive one at 0 bits cannot choose 0), and a
layer of two channels is one item (both at one width: a two-element list would read as a
``(w, a)`` pair).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Iterable, Sequence

import numpy as np
from torch import Tensor, nn

from .deploy.size import MB
from .errors import LowbitError
from .options import check_value
from .sensitivity import SensitivityReport, sensitivity

SOLVERS = ("dp", "greedy")


class _DefaultAverage(float):
    """The default ``avg_w_bits`` (3.0), distinguishable from an explicit 3.0 so that ``size_mb=`` alone works."""


DEFAULT_AVG_W_BITS = _DefaultAverage(3.0)
DEFAULT_RESOLUTION = 50_000


def solve_dp(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int,
             resolution: int = DEFAULT_RESOLUTION) -> list[int] | None:
    """Multiple-choice knapsack by dynamic programming: one choice per item, total cost <= budget.

    Args:
        costs: per item, the non-negative integer cost of each choice.
        values: per item, the value (to be minimised) of each choice.
        budget: the integer capacity.
        resolution: number of budget units (see the module docstring for the gap it implies).

    Returns:
        The chosen index per item, or None when no selection fits.
    """
    # costs above each item's cheapest choice: the cheapest selection costs 0, so it stays
    # feasible after rounding, and the resolution is spent on the slack only
    floors = [min(int(c) for c in row) for row in costs]
    slack = budget - sum(floors)
    if slack < 0:
        return None
    costs = [[int(c) - f for c in row] for row, f in zip(costs, floors)]
    unit = max(1, math.ceil(slack / resolution))
    cap = slack // unit
    inf = np.inf
    best = np.zeros(cap + 1)  # best[c]: least value of the items so far with rounded cost <= c
    picks: list[np.ndarray] = []
    for cost_row, value_row in zip(costs, values):
        new = np.full(cap + 1, inf)
        pick = np.full(cap + 1, -1, dtype=np.int16)
        for j, (c, v) in enumerate(zip(cost_row, value_row)):
            w = -(-int(c) // unit)  # rounded up: a DP-feasible map is truly feasible
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + float(v)
            better = cand < new
            new = np.where(better, cand, new)
            pick = np.where(better, j, pick)
        best = new
        picks.append(pick)
    if not np.isfinite(best[cap]):
        return None
    choice: list[int] = []
    c = cap
    for cost_row, pick in zip(reversed(costs), reversed(picks)):
        j = int(pick[c])
        choice.append(j)
        c -= -(-int(cost_row[j]) // unit)
    return choice[::-1]


def solve_greedy(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int) -> list[int] | None:
    """Multiple-choice knapsack by marginal-gain ascent (see the module docstring).

    Returns:
        The chosen index per item, or None when even the cheapest choices do not fit.
    """
    choice = [min(range(len(row)), key=lambda j: (row[j], values[i][j])) for i, row in enumerate(costs)]
    spent = sum(costs[i][j] for i, j in enumerate(choice))
    if spent > budget:
        return None
    while True:
        move: tuple[float, int, int] | None = None
        for i, j in enumerate(choice):
            for k in range(len(costs[i])):
                dc = costs[i][k] - costs[i][j]
                gain = values[i][j] - values[i][k]
                if dc <= 0 or gain <= 0 or spent + dc > budget:
                    continue
                ratio = gain / dc
                if move is None or ratio > move[0]:
                    move = (ratio, i, k)
        if move is None:
            return choice
        _, i, k = move
        spent += costs[i][k] - costs[i][choice[i]]
        choice[i] = k


def _widths(candidates: Iterable[int], granularity: str) -> tuple[int, ...]:
    try:
        widths = sorted(set(candidates))
    except TypeError:
        raise LowbitError(f"candidates must be a sequence of bit widths, got {candidates!r}") from None
    for b in widths:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 16:
            raise LowbitError(f"candidate widths must be integers 0..16, got {b!r}")
    if granularity == "layer":
        # 0 bits prunes; at layer granularity that removes a whole layer (and cuts the network),
        # so it is a per-channel choice only
        widths = [b for b in widths if b > 0]
    if not widths:
        raise LowbitError("no candidate width left (0 bits applies to granularity='channel' only)")
    return tuple(widths)


def weight_cost(report: SensitivityReport, name: str, bits: int, size: bool) -> int:
    """Storage of a layer at ``bits``: weight bits, or (``size``) bytes of the packed weights plus
    one float32 scale per output channel (as ``lowbit.deploy.size.quantized_bytes`` counts them)."""
    p = report.params[name]
    if size:
        return (p * bits + 7) // 8 + 4 * report.out_channels[name]
    return p * bits


def _mean_width(value: Any) -> float:
    """A map value's weight width averaged over its channels (pairs count their weight part)."""
    w = value[0] if isinstance(value, tuple) else value
    if isinstance(w, (list, tuple)):
        return sum(w) / len(w)
    return float(w)


def average_bits(layer_bits: dict[str, Any], params: dict[str, int]) -> float:
    """Parameter-weighted average weight bits of a map (pairs count their weight width, per-channel
    lists their mean: every channel of a layer holds as many weights)."""
    total = sum(params[n] for n in layer_bits)
    bits = sum(params[n] * _mean_width(v) for n, v in layer_bits.items())
    return bits / total


def solve_hull(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]],
               budget: int) -> tuple[list[int], float] | None:
    """Multiple-choice knapsack by the convex-hull greedy (see the module docstring).

    Returns:
        ``(choice, gap)``: the chosen index per item and the stated optimality gap (the value
        gain of the first hull step that did not fit, 0 when none was refused); None when the
        cheapest choices do not fit.
    """
    steps: list[tuple[float, int, int, int]] = []  # (-gain per cost, item, from, to)
    choice = []
    for i, (crow, vrow) in enumerate(zip(costs, values)):
        pts = sorted(range(len(crow)), key=lambda j: (crow[j], vrow[j]))
        hull = [pts[0]]
        for j in pts[1:]:
            if vrow[j] >= vrow[hull[-1]] or crow[j] == crow[hull[-1]]:
                continue  # costs more, gains nothing
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # b is above the segment a -> j: not on the lower hull
                if (vrow[b] - vrow[a]) * (crow[j] - crow[a]) >= (vrow[j] - vrow[a]) * (crow[b] - crow[a]):
                    hull.pop()
                else:
                    break
            hull.append(j)
        choice.append(hull[0])
        for a, b in zip(hull, hull[1:]):
            steps.append((-(vrow[a] - vrow[b]) / (crow[b] - crow[a]), i, a, b))
    spent = sum(costs[i][j] for i, j in enumerate(choice))
    if spent > budget:
        return None
    steps.sort(key=lambda t: (t[0], t[1]))
    gap = 0.0
    blocked: set[int] = set()
    for _, i, a, b in steps:
        if i in blocked or choice[i] != a:
            continue
        dc = costs[i][b] - costs[i][a]
        if spent + dc > budget:
            if not gap:
                gap = values[i][a] - values[i][b]
            blocked.add(i)  # its later steps build on this one
            continue
        spent += dc
        choice[i] = b
    return choice, gap


def _allocate_channels(report: SensitivityReport, widths: tuple[int, ...], budget: int,
                       fixed: dict[str, int]) -> dict[str, Any]:
    """Per-channel widths of every free layer (ints where a layer's channels agree) under ``budget``
    weight bits, ``fixed`` layers paying for their width."""
    scores = report.extra.get("channel_scores")
    if report.granularity != "channel" or not scores:
        raise LowbitError("granularity='channel' needs a per-channel sensitivity report "
                          "(lowbit.sensitivity(..., metric='taylor', per_channel=True))")
    choices = [b for b in widths if b == 0 or b in report.bits]
    if not [b for b in choices if b > 0]:
        raise LowbitError(f"the sensitivity report measured {list(report.bits)} bits, none of the "
                          f"candidates {list(widths)}")
    free = [n for n in report.order if n in report.scores and n not in fixed]
    remaining = budget - sum(report.params[n] * b for n, b in fixed.items())
    items: list[tuple[str, list[int], list[int]]] = []  # (layer, its channels in this item, allowed widths)
    costs, values = [], []
    for n in free:
        c_count, per = report.out_channels[n], report.params[n] // report.out_channels[n]
        rows = [scores[f"{n}[{c}]"] for c in range(c_count)]
        keep = max(range(c_count), key=lambda c: (rows[c].get(0, 0.0), -c))  # never pruned: the layer stays
        groups = [list(range(c_count))] if c_count == 2 else [[c] for c in range(c_count)]
        for chans in groups:
            allowed = [b for b in choices if b > 0 or keep not in chans]
            items.append((n, chans, allowed))
            costs.append([per * len(chans) * b for b in allowed])
            values.append([sum(rows[c][b] for c in chans) for b in allowed])
    solved = solve_hull(costs, values, remaining)
    if solved is None:
        raise LowbitError("weights: the budget is too small: the narrowest candidates for every channel"
                          f"{' and the fixed first/last layers' if fixed else ''} already exceed it")
    choice, _gap = solved
    chosen: dict[str, list[int]] = {n: [0] * report.out_channels[n] for n in free}
    for (n, chans, allowed), j in zip(items, choice):
        for c in chans:
            chosen[n][c] = allowed[j]
    out: dict[str, Any] = dict(fixed)
    for n, ws in chosen.items():
        out[n] = ws[0] if len(set(ws)) == 1 else ws
    spent = sum(report.params[n] // report.out_channels[n] * sum(v if isinstance(v, list) else [v] * report.out_channels[n])
                for n, v in out.items())
    assert spent <= budget, (spent, budget)
    return {n: out[n] for n in report.order if n in out}


def _allocate(report: SensitivityReport, widths: tuple[int, ...], budget: int,
              fixed: dict[str, int], solver: str, resolution: int, cost_of, what: str) -> dict[str, int]:
    """Solve one knapsack over the report's layers; ``fixed`` layers keep their width and pay for it."""
    measured = [b for b in widths if b in report.bits]
    if not measured:
        raise LowbitError(f"the sensitivity report measured {list(report.bits)} bits, none of the "
                          f"candidates {list(widths)}")
    free = [n for n in report.order if n in report.scores and n not in fixed]
    remaining = budget - sum(cost_of(n, b) for n, b in fixed.items())
    costs = [[cost_of(n, b) for b in measured] for n in free]
    values = [[report.scores[n][b] for b in measured] for n in free]
    least = remaining - sum(min(row) for row in costs)
    if least < 0:
        raise LowbitError(f"{what}: the budget is too small: the narrowest candidate ({measured[0]} bit) "
                          f"for every layer{' and the fixed first/last layers' if fixed else ''} already "
                          f"exceeds it")
    choice = solve_dp(costs, values, remaining, resolution) if solver == "dp" else \
        solve_greedy(costs, values, remaining)
    assert choice is not None  # the narrowest widths fit (checked above)
    out = dict(fixed)
    out.update({n: measured[j] for n, j in zip(free, choice)})
    spent = sum(cost_of(n, b) for n, b in out.items())
    assert spent <= budget, (spent, budget)  # rounded-up DP costs and the greedy's check guarantee it
    return {n: out[n] for n in report.order if n in out}


def allocate_bits(model: nn.Module | None = None, calib: Tensor | Iterable | None = None, avg_w_bits: float | None = DEFAULT_AVG_W_BITS,
                  avg_a_bits: float | None = None, granularity: str = "layer",
                  candidates: Iterable[int] = (0, 1, 2, 3, 4, 8), metric: str | None = None,
                  size_mb: float | None = None,
                  report: SensitivityReport | None = None, a_report: SensitivityReport | None = None,
                  first_last_bits: int | None = 8, solver: str = "dp", resolution: int = DEFAULT_RESOLUTION,
                  **sensitivity_options: Any) -> dict[str, Any]:
    """A per-layer bit-width map under a budget, usable as ``layer_bits=``.

    Args:
        model, calib: the FP model and calibration data to measure sensitivity on (not needed
            when ``report`` (and for activations ``a_report``) is given).
        avg_w_bits: budget as the parameter-weighted average weight bits over the quantizable
            layers (the first and last layer included at their fixed width).
        avg_a_bits: also allocate input widths, under this average weighted by each layer's input
            elements per image; the map's values become ``(w_bits, a_bits)`` pairs.
        granularity: "layer", or "channel": every output channel of a free layer gets its own
            width from the candidates, 0 pruning it (the map's values are then per-channel lists
            where a layer's channels differ; see the module docstring for the solver and its
            gap). At layer granularity 0 is dropped from the candidates: 0 bits would prune a
            whole layer. "channel" budgets average weight bits only (not ``size_mb`` nor
            ``avg_a_bits``) and needs the Taylor metric.
        candidates: widths to choose from.
        metric: the sensitivity metric, "kl" or "taylor" (LBA's score); default "kl" per layer,
            "taylor" per channel (the only metric with per-channel scores).
        size_mb: budget in MB (2^20 bytes) of the quantizable layers' weights at their widths
            plus one float32 scale per output channel, instead of ``avg_w_bits``; biases and
            other float tensors are not counted.
        report: a weight ``SensitivityReport`` to allocate from (skips the measurement).
        a_report: an activation ``SensitivityReport`` for ``avg_a_bits``.
        first_last_bits: width of the first and last layer's weights (and the last layer's
            input), fixed and counted in the budget (the field's protocol); None lets the
            solver choose them too.
        solver: "dp" (exact up to the discretisation gap) or "greedy".
        resolution: budget units of the DP.
        **sensitivity_options: passed to ``lowbit.sensitivity`` (``w_range``, QuantConfig fields,
            ``progress``, ...).

    Returns:
        {exact layer name: w_bits}, or {name: (w_bits, a_bits)} with ``avg_a_bits`` (a layer
        whose input is not quantized, by default the first, keeps an int); per channel
        {name: w_bits or [w_0, w_1, ...]} (a list where a layer's channels differ); the true
        budget measure of the map never exceeds the budget.
    """
    granularity = check_value(granularity, str, "granularity", "lowbit.allocate_bits")
    if granularity not in ("layer", "channel"):
        raise LowbitError(f"granularity must be 'layer' or 'channel', got {granularity!r}")
    per_channel = granularity == "channel"
    if metric is None:
        metric = "taylor" if per_channel else "kl"
    if per_channel and metric != "taylor":
        raise LowbitError(f"granularity='channel' scores channels by the Taylor score: use metric='taylor', "
                          f"got {metric!r}")
    if per_channel and (size_mb is not None or avg_a_bits is not None):
        raise LowbitError("granularity='channel' allocates weight widths under avg_w_bits only (no size_mb, "
                          "no avg_a_bits)")
    solver = check_value(solver, str, "solver", "lowbit.allocate_bits")
    if solver not in SOLVERS:
        raise LowbitError(f"solver must be one of {SOLVERS}, got {solver!r}")
    resolution = check_value(resolution, int, "resolution", "lowbit.allocate_bits")
    if resolution < 1:
        raise LowbitError(f"resolution must be >= 1, got {resolution}")
    if size_mb is not None and type(avg_w_bits) is _DefaultAverage:
        avg_w_bits = None  # size_mb= replaces the default average
    if (avg_w_bits is None) == (size_mb is None):
        raise LowbitError("give exactly one weight budget: avg_w_bits=... or size_mb=...")
    for name, value in (("avg_w_bits", avg_w_bits), ("avg_a_bits", avg_a_bits), ("size_mb", size_mb)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise LowbitError(f"{name} must be a positive number, got {value!r}")
    if first_last_bits is not None and (isinstance(first_last_bits, bool) or not isinstance(first_last_bits, int)
                                        or not 1 <= first_last_bits <= 16):
        raise LowbitError(f"first_last_bits must be 1..16 or None, got {first_last_bits!r}")
    widths = _widths(candidates, granularity)
    measure = tuple(sorted(set(widths)))

    def measured(given: SensitivityReport | None, target: str) -> SensitivityReport:
        if given is not None:
            if not isinstance(given, SensitivityReport):
                raise LowbitError(f"a report must be a lowbit SensitivityReport, got {type(given).__name__}")
            if given.target != target:
                raise LowbitError(f"the report measured {given.target!r}; this budget needs {target!r}")
            return given
        if model is None or calib is None:
            raise LowbitError("allocate_bits needs model and calib, or a precomputed report=")
        extra = {"per_channel": True} if per_channel and target == "weights" else {}
        return sensitivity(model, calib, bits=tuple(b for b in measure if b > 0), target=target, metric=metric,
                           **extra, **sensitivity_options)

    w_report = measured(report, "weights")
    names = [n for n in w_report.order if n in w_report.scores]
    ends = {names[0], names[-1]} if names and first_last_bits is not None else set()
    size = size_mb is not None
    if size:
        budget = math.floor(Fraction(size_mb) * MB)
    else:
        budget = math.floor(Fraction(avg_w_bits) * sum(w_report.params[n] for n in names))
    if per_channel:
        return _allocate_channels(w_report, widths, budget, {n: first_last_bits for n in ends})
    w_map = _allocate(w_report, widths, budget, {n: first_last_bits for n in ends}, solver,
                      resolution, lambda n, b: weight_cost(w_report, n, b, size), "weights")
    if avg_a_bits is None:
        return w_map
    a_rep = measured(a_report, "activations")
    a_names = [n for n in a_rep.order if n in a_rep.scores]
    elems = a_rep.input_elements
    fixed_a = {names[-1]: first_last_bits} if first_last_bits is not None and names[-1] in a_names else {}
    a_budget = math.floor(Fraction(avg_a_bits) * sum(elems[n] for n in a_names))
    a_map = _allocate(a_rep, widths, a_budget, fixed_a, solver, resolution,
                      lambda n, b: elems[n] * b, "activations")
    return {n: (w, a_map[n]) if n in a_map else w for n, w in w_map.items()}
