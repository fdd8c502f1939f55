"""LAPQ: loss-aware post-training quantization (Nahshan et al., 2019).

1. Lp initialisation: every clipping value (weights and activations) is set to the one that
   minimises ||x - Q(x)||_p, for each p of a small sweep; the task loss of each Lp-initialised
   network is measured, a parabola fitted to loss(p) gives p*, and the better of p* and the best
   sampled p is the start.
2. Joint optimisation: all clipping values together minimise the task loss on a fixed subset
   of the calibration data with Powell's derivative-free method (conjugate directions, each line
   search bracketed and refined by parabolic / golden-section steps). The search runs over
   log-multipliers of each quantizer's start scale (one per quantizer: per-channel or per-group
   weight scales move together), so scales stay positive and steps are relative.

The task loss is the KL divergence of the quantized network's softmax from the FP network's
(calibration data carry no labels here): the cross-entropy against the FP predictions up to a
constant. Scales only change, so the result exports like any other PTQ method.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..progress import progress_bar
from ..quant.layers import quant_layers
from ..quant.quantizer import ActObserver, ActQuantizer
from ..quant.ranges import lp_search_range
from ..record import record_of
from .common import calibrate_inputs, calibrate_weights, observe_fp_inputs, quantizers_disabled
from .registry import register_method

GOLDEN = 0.3819660112501051  # 2 - golden ratio: golden-section step
GROW = 1.618033988749895     # bracket expansion factor


@dataclass(frozen=True)
class LapqOptions:
    """Options of ``method="lapq"``.

    Attributes:
        p_min: smallest p of the Lp initialisation sweep.
        p_max: largest p of the sweep.
        p_count: number of p values, evenly spaced in ``[p_min, p_max]`` (1: only ``p_min``).
        candidates: clip ratios tried by each Lp search (shrinking the min/max range by ``shrink``).
        shrink: step of the clip ratio.
        lp_samples: activation values each Lp search runs on (a seeded subsample of those
            observed, extremes kept; 0: all). The sweep runs ``p_count`` searches per input.
        iters: Powell iterations (each: one line search along every direction, then one along
            the new conjugate direction).
        line_evals: loss evaluations per line search at most.
        step: first step of a line search, in log(scale) (0.1: about 10%).
        max_evals: cap on loss evaluations of the joint search (0: only ``iters`` bounds it).
        loss_images: calibration images the task loss is measured on (a fixed, seeded subset).
    """

    p_min: float = 2.0
    p_max: float = 4.0
    p_count: int = 5
    candidates: int = 100
    shrink: float = 0.01
    lp_samples: int = 65536
    iters: int = 2
    line_evals: int = 6
    step: float = 0.1
    max_evals: int = 0
    loss_images: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.p_min <= self.p_max or self.p_count < 1:
            raise LowbitError("lapq options: 0 < p_min <= p_max and p_count >= 1")
        if self.candidates < 1 or not 0 < self.shrink < 1 or self.lp_samples < 0:
            raise LowbitError("lapq options: candidates >= 1, 0 < shrink < 1 and lp_samples >= 0")
        if self.iters < 0 or self.line_evals < 1 or not self.step > 0 or self.max_evals < 0 or self.loss_images < 1:
            raise LowbitError("lapq options: iters >= 0, line_evals >= 1, step > 0, max_evals >= 0, loss_images >= 1")

    def p_values(self) -> list[float]:
        if self.p_count == 1:
            return [self.p_min]
        return [float(p) for p in np.linspace(self.p_min, self.p_max, self.p_count)]


# ---------------------------------------------------------------------------------------------
# Derivative-free minimisation (pure functions of a callable)
# ---------------------------------------------------------------------------------------------

def line_minimize(g: Callable[[float], float], f0: float, step: float, budget: int) -> tuple[float, float]:
    """Minimise ``g`` along a line from ``g(0) = f0`` with at most ``budget`` evaluations.

    Brackets a minimum (stepping ``step`` each way, then growing the step by the golden ratio
    while the loss falls) and refines the bracket by parabolic interpolation, falling back to
    golden-section steps. Returns the best ``(a, g(a))`` seen, so never worse than ``(0, f0)``.
    """
    best = [0.0, f0]
    left = [budget]

    def ev(a: float) -> float:
        left[0] -= 1
        v = g(a)
        if v < best[1]:
            best[0], best[1] = a, v
        return v

    if budget < 1:
        return best[0], best[1]
    a, fa = 0.0, f0
    b = step
    fb = ev(b)
    if fb >= fa:
        if left[0] < 1:
            return best[0], best[1]
        c, fc = -step, ev(-step)
        if fc >= fa:
            lo, flo, mid, fmid, hi, fhi = -step, fc, 0.0, f0, step, fb
        else:
            a, fa, b, fb = 0.0, f0, -step, fc
            lo = None
    else:
        lo = None
    if lo is None:  # (a, b) descends: grow until the loss rises again
        while True:
            if left[0] < 1:
                return best[0], best[1]
            c = b + GROW * (b - a)
            fc = ev(c)
            if fc >= fb:
                break
            a, fa, b, fb = b, fb, c, fc
        (lo, flo), (hi, fhi) = sorted([(a, fa), (c, fc)])
        mid, fmid = b, fb
    parabolic = True
    while left[0] > 0:
        x = None
        if parabolic:
            num = (mid - lo) ** 2 * (fmid - fhi) - (mid - hi) ** 2 * (fmid - flo)
            den = (mid - lo) * (fmid - fhi) - (mid - hi) * (fmid - flo)
            if den != 0:
                u = mid - 0.5 * num / den
                if lo < u < hi and abs(u - mid) > 1e-3 * (hi - lo):
                    x = u
        if x is None:
            x = mid + GOLDEN * (hi - mid) if hi - mid > mid - lo else mid - GOLDEN * (mid - lo)
        fx = ev(x)
        parabolic = fx < fmid  # a parabolic step that did not help is followed by a golden one
        if fx < fmid:
            if x > mid:
                lo, flo = mid, fmid
            else:
                hi, fhi = mid, fmid
            mid, fmid = x, fx
        elif x > mid:
            hi, fhi = x, fx
        else:
            lo, flo = x, fx
    return best[0], best[1]


def powell(f: Callable[[Tensor], float], x0: Tensor, iters: int, line_evals: int = 6, step: float = 0.1,
           max_evals: int = 0, ftol: float = 1e-6, progress: bool | None = False) -> tuple[Tensor, float, int]:
    """Powell's conjugate-direction method (Numerical Recipes' variant), monotone.

    Each iteration line-searches along every direction of the set, then along the net move of the
    iteration, which replaces the direction of largest decrease when Powell's test accepts it.

    Returns:
        ``(x, f(x), evaluations)``; ``f(x) <= f(x0)`` always.
    """
    x = x0.detach().double().clone()
    count = [0]

    def fx_of(v: Tensor) -> float:
        count[0] += 1
        return float(f(v))

    def left() -> int:
        return line_evals if not max_evals else min(line_evals, max_evals - count[0])

    def search(x: Tensor, fx: float, d: Tensor) -> tuple[Tensor, float]:
        a, fa = line_minimize(lambda a: fx_of(x + a * d), fx, step, left())
        return (x + a * d, fa) if fa < fx else (x, fx)

    fx = fx_of(x)
    dirs = list(torch.eye(len(x), dtype=torch.float64))
    bar = progress_bar(range(iters), desc="lapq: Powell", enable=progress)
    for _ in bar:
        x_start, f_start = x.clone(), fx
        drop, drop_i = 0.0, 0
        for i, d in enumerate(dirs):
            if left() < 1:
                break
            f_before = fx
            x, fx = search(x, fx, d)
            if f_before - fx > drop:
                drop, drop_i = f_before - fx, i
        bar.set_postfix(loss=f"{fx:.5g}", evals=count[0])
        if left() < 1 or 2 * (f_start - fx) <= ftol * (abs(f_start) + abs(fx)) + 1e-15:
            break
        move = x - x_start
        x_ext = x + move
        f_ext = fx_of(x_ext)
        if f_ext < f_start:
            t = 2 * (f_start - 2 * fx + f_ext) * (f_start - fx - drop) ** 2 - drop * (f_start - f_ext) ** 2
            if f_ext < fx:
                x, fx = x_ext, f_ext
            if t < 0 and left() > 0:
                d_new = move / move.abs().max()
                x, fx = search(x, fx, d_new)
                dirs[drop_i] = dirs[-1]
                dirs[-1] = d_new
    return x, fx, count[0]


# ---------------------------------------------------------------------------------------------
# The objective: task loss as a function of every clipping value
# ---------------------------------------------------------------------------------------------

class ClipObjective:
    """KL(FP || quantized) softmax on fixed images, as a function of log-multipliers of all scales.

    ``x[i]`` multiplies quantizer ``i``'s scale(s) at construction by ``exp(x[i])`` (zero points
    stay, so an asymmetric range scales about its zero point).
    """

    def __init__(self, qmodel: nn.Module, images: Tensor, cfg: QuantConfig) -> None:
        self.model = qmodel
        self.cfg = cfg
        self.quantizers = [q for _, layer in quant_layers(qmodel)
                           for q in (layer.weight_quant, layer.input_quant) if q.enabled]
        self.base: list[Tensor] = []
        self.rebase()
        self.images = images.to(cfg.device)
        with quantizers_disabled(qmodel):
            self.targets = self._logits().log_softmax(1)

    def rebase(self) -> None:
        """Make the scales as they are now the start (``x = 0``)."""
        self.base = [q.scale.detach().clone() for q in self.quantizers]

    @torch.no_grad()
    def _logits(self) -> Tensor:
        bs = self.cfg.batch_size
        return torch.cat([self.model(self.images[i:i + bs]).double() for i in range(0, len(self.images), bs)])

    @torch.no_grad()
    def set(self, x: Tensor) -> None:
        """Set every scale to its start value times ``exp(x)``."""
        for q, base, xi in zip(self.quantizers, self.base, x.tolist()):
            q.scale.copy_(base * math.exp(xi))

    @torch.no_grad()
    def loss(self) -> float:
        """The task loss with the scales as they are now."""
        out = self._logits().log_softmax(1)
        return float(F.kl_div(out, self.targets, log_target=True, reduction="batchmean"))

    def __call__(self, x: Tensor) -> float:
        self.set(x)
        return self.loss()


def loss_subset(calib: Tensor, n: int, seed: int) -> Tensor:
    """The fixed, seeded ``n`` calibration images the LAPQ loss is measured on (all if fewer)."""
    if n >= len(calib):
        return calib
    return calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))[:n]]


@torch.no_grad()
def lp_init(qmodel: nn.Module, observers: dict[str, ActObserver], p: float, opts: LapqOptions) -> None:
    """Set every weight and activation clip to its Lp-optimal value."""
    calibrate_weights(qmodel, lp_search_range, p=p, candidates=opts.candidates, shrink=opts.shrink)
    calibrate_inputs(qmodel, observers, lp_search_range, p=p, candidates=opts.candidates, shrink=opts.shrink)


def subsample_observers(observers: dict[str, ActObserver], n: int, seed: int) -> dict[str, ActObserver]:
    """Observers holding at most ``n`` of the sampled values each (seeded), with the exact extremes."""
    if n <= 0:
        return observers
    out = {}
    gen = torch.Generator().manual_seed(seed)
    for name, obs in observers.items():
        values = obs.values()
        small = ActObserver(seed=seed)
        small.lo, small.hi = obs.lo, obs.hi
        if len(values) > n:
            values = values[torch.randperm(len(values), generator=gen)[:n]]
        small.samples = [values]  # values() appends the extremes again
        out[name] = small
    return out


def _clip_state(qmodel: nn.Module) -> list[tuple[Tensor, Tensor, bool]]:
    """Scale, zero point and code signedness of every quantizer (to restore a calibration)."""
    return [(q.scale.clone(), q.zero_point.clone(), q.signed) for _, layer in quant_layers(qmodel)
            for q in (layer.weight_quant, layer.input_quant)]


@torch.no_grad()
def _set_clip_state(qmodel: nn.Module, state: list[tuple[Tensor, Tensor, bool]]) -> None:
    quantizers = [q for _, layer in quant_layers(qmodel) for q in (layer.weight_quant, layer.input_quant)]
    for q, (scale, zero_point, signed) in zip(quantizers, state):
        q.scale.copy_(scale)
        q.zero_point.copy_(zero_point)
        if isinstance(q, ActQuantizer):
            q.signed = signed


def best_p(ps: list[float], losses: list[float]) -> float:
    """Minimiser of the parabola fitted to ``loss(p)`` inside the sweep, else the best sampled p."""
    i = int(np.argmin(losses))
    if len(ps) < 3 or not all(map(math.isfinite, losses)):
        return ps[i]
    a, b, _ = np.polyfit(ps, losses, 2)
    if a <= 0:
        return ps[i]
    return float(min(max(-b / (2 * a), ps[0]), ps[-1]))


@register_method("lapq", LapqOptions,
                 description="LAPQ: Lp-norm initialisation over p, then Powell on all clipping values against the loss")
def lapq(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: LapqOptions) -> dict:
    """Loss-aware PTQ; returns a report (p sweep, chosen p, start and final loss, evaluations), also
    kept as ``record_of(qmodel).lapq``."""
    start = time.perf_counter()
    observers = subsample_observers(observe_fp_inputs(qmodel, calib, cfg), opts.lp_samples, cfg.seed)
    objective = ClipObjective(qmodel, loss_subset(calib, opts.loss_images, cfg.seed), cfg)
    ps = opts.p_values()
    sweep, states = [], []
    for p in progress_bar(ps, desc="lapq: Lp sweep", enable=cfg.progress):
        lp_init(qmodel, observers, p, opts)
        sweep.append(objective.loss())
        states.append(_clip_state(qmodel))
    best = int(np.argmin(sweep))
    p_star, p_loss, state = ps[best], sweep[best], states[best]
    p_fit = best_p(ps, sweep)
    if p_fit not in ps:
        lp_init(qmodel, observers, p_fit, opts)
        fit_loss = objective.loss()
        if fit_loss <= p_loss:  # else the parabola missed: start from the best p measured
            p_star, p_loss, state = p_fit, fit_loss, _clip_state(qmodel)
    _set_clip_state(qmodel, state)
    objective.rebase()  # log-multipliers relative to the Lp start
    x, final, evals = powell(objective, torch.zeros(len(objective.quantizers), dtype=torch.float64), opts.iters,
                             opts.line_evals, opts.step, opts.max_evals, progress=cfg.progress)
    objective.set(x)
    report = {"p_sweep": dict(zip(ps, sweep)), "p": p_star, "start_loss": p_loss, "final_loss": final,
              "evals": evals, "seconds": time.perf_counter() - start}
    record_of(qmodel).lapq = report
    return report
