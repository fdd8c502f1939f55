"""TSQ: Two-Step Quantization (Wang et al., CVPR 2018), sparse activation codes then low-bit weights.

Step 1, code learning (the QAT engine's training): full-precision weights, *sparse* quantized
activations on the body layers' non-negative inputs (``quant.sparse``): 0 up to a threshold
``eps``, uniform levels ``delta, 2 delta, ...`` above it. ``eps`` is at least ``threshold_floor``
times the step (default 1/2: the least-squares threshold, fitted jointly with the step and
following the learned step) and at least the ``sparsity`` quantile of the positive inputs
(default 0: none), fitted on the calibration images and tracked as a moving average over the
training batches (``track_threshold``). On ResNet-20 W2A2 a quantile threshold alone (0.2) left
step 2 1.7 points lower than the floor in a small diagnostic (2000 images, 1 epoch: 88.2 vs
89.9 on 1000 test images). The step is learned (LSQ gradient); straight-through
gradient inside the active range ``(eps, qmax * delta]`` only. Inputs that can be negative and
the 8-bit protocol layers keep LSQ quantizers.

Step 2, transformation learning (``finalize``), layer by layer on the step-1 network's codes: with
X the layer's quantized input patches and y the target of each output channel, solve

    min_{alpha > 0, w in the b-bit integer set} ||y - Q(alpha X w + b)||^2

where Q is what turns the layer's output into the next codes: ``quant_next(act(.))`` when the
output reaches a quantized layer through ReLU / ReLU6 alone (detected on the data), else the
identity (residual sums, the classifier), with y then the step-1 layer output. As in the paper
the problem is relaxed with an auxiliary z::

    g(alpha, w, z) = ||y - Q(z)||^2 + lam ||z - (alpha X w + b)||^2

and each round minimises g exactly in z (closed form per element: the best level and the nearest
point of its interval), in alpha (``alpha = t^T w / (w^T A w)``, ``A = X^T X``, ``t = X^T (z - b)``)
and in each coordinate of w (the exact integer minimiser, Gauss-Seidel, all output channels at
once), so g never increases. Ternary weights start from the optimal ternary approximation of the
FP weights (``optimal_ternary``), wider ones from Bit-Split's alternating fit.

Optional step 3 (``finetune_epochs``): a short LSQ fine-tune of the quantized network, whose
latent weights start as the step-1 weights clamped into the bins of their step-2 codes
(``project_latent_weights``): the same network at the start, but codes that step 1 disagrees with
flip after small updates (from the bin centres a low-lr fine-tune changed no code at all).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import LowbitError
from ..evaluate import accuracy, predict
from ..options import Range
from ..progress import progress_bar
from ..ptq.start import mse_start
from ..ptq.bitsplit import lloyd_weight_scale
from ..ptq.layerwise import output_positions, patch_rows, rows_to_weight, scale_group_of_rows, weight_rows
from ..quant.layers import layer_kind, per_output_channel, quant_layers
from ..quant.learnable import commit_stand_ins
from ..quant.quantizer import ActQuantizer
from ..quant.declare import settled_input, sparse_input
from ..quant.layer_specs import input_quantizer, training_input_quantizer, training_weight_quantizer
from ..quant.ranges import lp_search_range
from ..quant.sparse import SparseActQuantizer, fit_sparse_step, positive_quantile
from ..record import record_of
from .registry import FinalizeContext, register_qat_method


@dataclass(frozen=True)
class TsqOptions:
    """Options of ``method="tsq"``.

    Attributes:
        sparsity: share of the positive body-layer inputs set to 0 at least (the threshold ``eps``
            is at least their quantile); 0: no share imposed (the threshold is the floor below).
        threshold_floor: the threshold is at least this multiple of the step. 0.5 (default) zeroes
            exactly the values that cost less as 0 than as the first level (the least-squares
            threshold for the step, fitted jointly with it and following the learned step), so that
            ``sparsity`` only adds zeros beyond those; 0: the quantile alone (values between it and
            the first level are rounded up to that level).
        track_threshold: keep the threshold at that quantile of the training batches (moving
            average) during step 1; False: fixed at the calibration images' value.
        threshold_momentum: moving-average momentum of the tracked threshold.
        iters: step-2 rounds (z, alpha, one sweep over the weight coordinates) per layer.
        samples: patch rows per layer in step 2 (drawn from the calibration images).
        lam: weight of the coupling term ``||z - (alpha X w + b)||^2`` in step 2.
        error_compensation: step 2 takes each layer's input X from the network whose earlier
            layers are already quantized (targets stay the step-1 network's); False: X from the
            step-1 network, as in the paper (every layer fitted independently).
        residual_targets: a layer whose output is added to a shortcut before the activation that
            feeds a quantized layer (a residual block's last conv) is fitted to the codes of that
            block output, ``Q(act(conv + shortcut))``, with the shortcut as measured (in the
            partly quantized network under ``error_compensation``); False (default): to its own
            step-1 output (identity Q). On ResNet-20 W2A2 (5000 images, 2 epochs) the block-output
            codes gave 88.05 after step 2 against 88.38: the identity shortcut carries the block
            output unquantized to the next block, so its FP values matter beyond their codes.
        finetune_epochs: epochs of LSQ fine-tuning after step 2 (0: none).
        finetune_lr: learning rate of that fine-tune (cosine). On ResNet-20 W2A2 (2000 images, 1 epoch,
            2000 test images) 0.03 gave 89.10 against 88.65 at 0.01.
        finetune_bn: a BatchNorm after every quantized conv during the fine-tune (identity at the start,
            folded exactly into the per-channel weight scales and biases at the end). Without it
            the network trains with BN folded (as in step 1), which LSQ itself cannot do from a
            ternary start (9.4 top-1 against 87.7 with BN, ResNet-20 W2A2, 2000 images, 1 epoch);
            the fine-tune then recovered 0.1 points (88.40 against 88.65 with it).
        project_latent: the fine-tune's latent weights start as the step-1 weights clamped into
            the bins of their step-2 codes (``project_latent_weights``); False: at the codes
            (bin centres), 87.70 against 88.65 in the same diagnostic.
    """

    sparsity: Annotated[float, Range(ge=0, lt=1)] = 0.0
    threshold_floor: Annotated[float, Range(ge=0, le=1)] = 0.5
    track_threshold: bool = True
    threshold_momentum: Annotated[float, Range(ge=0, lt=1)] = 0.99
    iters: Annotated[int, Range(ge=1)] = 8
    samples: Annotated[int, Range(ge=1)] = 8192
    lam: Annotated[float, Range(gt=0)] = 1.0
    error_compensation: bool = True
    residual_targets: bool = False
    finetune_epochs: Annotated[int, Range(ge=0)] = 0
    finetune_lr: Annotated[float, Range(gt=0)] = 0.03
    finetune_bn: bool = True
    project_latent: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1 or not 0 <= self.threshold_momentum < 1 or not 0 <= self.threshold_floor <= 1:
            raise LowbitError("tsq: 0 <= sparsity < 1, 0 <= threshold_momentum < 1 and 0 <= threshold_floor <= 1")
        if self.iters < 1 or self.samples < 1 or self.lam <= 0 or self.finetune_epochs < 0 or self.finetune_lr <= 0:
            raise LowbitError("tsq: iters >= 1, samples >= 1, lam > 0, finetune_epochs >= 0 and finetune_lr > 0")


# ---------------------------------------------------------------------------------------------
# Step 2: the per-channel solver (pure functions on tensors)
# ---------------------------------------------------------------------------------------------

def optimal_ternary(w: Tensor) -> tuple[Tensor, Tensor]:
    """Best ``alpha * t`` with ``t`` in {-1, 0, 1}^D for each row of ``w`` (``... x D``).

    For a support of size k the best t is the sign of the k largest |w| and alpha their mean, with
    error ``||w||^2 - (sum of the top k |w|)^2 / k``; the best k maximises the last term.
    Returns ``(t, alpha)`` (alpha 0 for an all-zero row).
    """
    a = w.abs()
    s, order = a.sort(-1, descending=True)
    cs = s.cumsum(-1)
    k = torch.arange(1, w.shape[-1] + 1, device=w.device, dtype=w.dtype)
    best = (cs * cs / k).argmax(-1, keepdim=True)  # k - 1 of the best support
    alpha = cs.gather(-1, best).squeeze(-1) / (best.squeeze(-1) + 1).to(w.dtype)
    keep_sorted = (torch.arange(w.shape[-1], device=w.device) <= best).to(w.dtype)
    keep = torch.zeros_like(w).scatter_(-1, order, keep_sorted)
    return torch.sign(w) * keep, alpha


@dataclass(frozen=True)
class Levels:
    """The piecewise-constant map Q from a layer's output z to the next layer's quantized input.

    Code k covers ``lo[k] < z <= hi[k]`` and has the value ``value[k]``; an empty code has
    ``lo > hi`` (never chosen). ``None`` in place of a Levels object means Q is the identity.
    """

    lo: Tensor
    hi: Tensor
    value: Tensor

    def __call__(self, z: Tensor) -> Tensor:
        code = torch.zeros_like(z, dtype=torch.long)
        for k in range(1, len(self.value)):
            code = torch.where(z > self.lo[k], torch.full_like(code, k), code)
        return self.value.to(z.dtype)[code]


def sparse_levels(threshold: float, step: float, qmax: int, cap: float | None, dtype: torch.dtype,
                  device: torch.device) -> Levels:
    """Q(z) = sparse quantization of ``act(z)``, act = ReLU (``cap`` None) or ReLU6-like ``min(relu, cap)``."""
    inf = float("inf")
    lo, hi, value = [-inf], [threshold], [0.0]
    for k in range(1, qmax + 1):
        a = max(threshold, (k - 0.5) * step)
        b = (k + 0.5) * step if k < qmax else inf
        if cap is not None:  # the activation never exceeds cap: the code holding cap reaches to +inf
            if a >= cap:
                a, b = inf, -inf  # unreachable
            elif b >= cap:
                b = inf
        lo.append(a)
        hi.append(b)
        value.append(k * step)
    t = lambda v: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
    return Levels(t(lo), t(hi), t(value))


def _z_step(y: Tensor, v: Tensor, levels: Levels | None, lam: float) -> tuple[Tensor, Tensor]:
    """Exact minimiser over z of ``(y - Q(z))^2 + lam (z - v)^2``, elementwise; returns (z, Q(z))."""
    if levels is None:
        z = (y + lam * v) / (1 + lam)
        return z, z
    best_cost = best_z = best_q = None
    for k in range(len(levels.value)):
        lo, hi = levels.lo[k].item(), levels.hi[k].item()
        if lo > hi:
            continue
        # the interval is (lo, hi]: its point nearest to v, a hair above an open lower end, so that
        # Q(z) is this level (the cost is then within ~1e-9 of the infimum)
        if math.isfinite(lo):
            lo = lo + 1e-9 * max(1.0, abs(lo))
        zc = v.clamp(min=lo if math.isfinite(lo) else None, max=hi if math.isfinite(hi) else None)
        q = levels.value[k].item()
        cost = (y - q) ** 2 + lam * (zc - v) ** 2
        if best_cost is None:
            best_cost, best_z, best_q = cost, zc, torch.full_like(v, q)
        else:
            better = cost < best_cost
            best_cost = torch.where(better, cost, best_cost)
            best_z = torch.where(better, zc, best_z)
            best_q = torch.where(better, torch.full_like(v, q), best_q)
    return best_z, best_q


def relaxed_objective(X: Tensor, y: Tensor, bias: Tensor, q: Tensor, alpha: Tensor, z: Tensor, qz: Tensor,
                      lam: float) -> Tensor:
    """``||y - Q(z)||^2 + lam ||z - (alpha X w + b)||^2`` per channel (``K x C``); ``qz`` = Q(z)."""
    v = torch.bmm(X, (q * alpha.unsqueeze(-1)).transpose(1, 2)) + bias.unsqueeze(1)
    return ((y - qz) ** 2).sum(1) + lam * ((z - v) ** 2).sum(1)


def true_objective(X: Tensor, y: Tensor, bias: Tensor, q: Tensor, alpha: Tensor, levels: Levels | None,
                   offset: Tensor | None = None) -> Tensor:
    """``||y - Q(alpha X w + b + offset)||^2`` per channel (``K x C``; ``offset`` only with ``levels``)."""
    v = torch.bmm(X, (q * alpha.unsqueeze(-1)).transpose(1, 2)) + bias.unsqueeze(1)
    out = v if levels is None else levels(v if offset is None else v + offset)
    return ((y - out) ** 2).sum(1)


def _sweep(q: Tensor, A: Tensor, diag: Tensor, Aq: Tensor, t_scaled: Tensor, qmin: int, qmax: int,
           binary: bool) -> None:
    """One Gauss-Seidel sweep of exact integer coordinate updates of ``q`` (``K x C x D``), in place.

    With alpha fixed the objective in coordinate n is ``A_nn q_n^2 - 2 q_n (t_n / alpha - u_n)``
    (u = A q without coordinate n): its integer minimiser is the clamped rounding of the
    continuous one (the sign for binary codes). ``Aq`` (= q A) is kept up to date.
    """
    inv = torch.where(diag > 0, 1.0 / diag.clamp_min(1e-300), torch.zeros_like(diag))  # K x D
    for n in range(q.shape[-1]):
        old = q[:, :, n]
        target = (t_scaled[:, :, n] - Aq[:, :, n]) * inv[:, n].unsqueeze(-1) + old
        if binary:
            new = torch.where(target >= 0, 1.0, -1.0).to(q.dtype)
        else:
            new = target.clamp(qmin, qmax).round()
        new = torch.where(diag[:, n].unsqueeze(-1) > 0, new, old)  # a dead input keeps its code
        Aq.addcmul_((new - old).unsqueeze(-1), A[:, n, :].unsqueeze(1))
        q[:, :, n] = new


def _alpha_step(q: Tensor, t: Tensor, Aq: Tensor, symmetric: bool = True) -> Tensor:
    """Closed-form positive alpha per channel.

    A channel whose best alpha is negative flips its codes when the code set is symmetric (the
    same objective with a positive alpha); in a full range (``-2^(b-1)`` has no mirror) it takes the
    infimum over alpha > 0 instead, a tiny alpha, and the next coordinate sweep moves its codes.
    """
    num, den = (q * t).sum(-1), (q * Aq).sum(-1)
    flip = num < 0
    if symmetric and flip.any():
        q.mul_(torch.where(flip, -1.0, 1.0).to(q.dtype).unsqueeze(-1))
        Aq.mul_(torch.where(flip, -1.0, 1.0).to(Aq.dtype).unsqueeze(-1))
        num = num.abs()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).clamp_min(1e-12)


def init_codes(w: Tensor, bits: int, binary: bool, narrow: bool = True) -> tuple[Tensor, Tensor]:
    """Initial integer codes and per-row scale of FP rows ``w`` (``K x C x D``).

    Ternary (2-bit narrow): the optimal ternary approximation; binary: signs and mean |w|; wider:
    Bit-Split's alternating fit ``q = clip(round(w / a))``, ``a = <w, q> / <q, q>`` on the symmetric
    part of the range (a full range's extra negative code is left to the coordinate updates).
    """
    if binary:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype), w.abs().mean(-1).clamp_min(1e-12)
    qmax = 2 ** (bits - 1) - 1
    if qmax == 1:
        t, alpha = optimal_ternary(w)
        return t, alpha.clamp_min(1e-12)
    rows = w.reshape(-1, w.shape[-1])
    alpha = lloyd_weight_scale(rows, qmax).reshape(w.shape[:-1])
    return torch.clamp(torch.round(w / alpha.unsqueeze(-1)), -qmax, qmax), alpha


@torch.no_grad()
def tsq_fit(X: Tensor, y: Tensor, bias: Tensor, w: Tensor, bits: int, levels: Levels | None, lam: float = 1.0,
            iters: int = 8, binary: bool = False, history: list | None = None,
            narrow: bool = True, offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """TSQ's transformation learning for every output channel of one layer at once.

    Args:
        X: ``K x R x D`` input rows (K conv groups, R sampled positions).
        y: ``K x R x C`` targets of the C output channels of each group.
        bias: ``K x C`` (fixed) bias of the layer's output.
        w: ``K x C x D`` FP weights (initialisation).
        bits: weight bits (2 with ``narrow`` = ternary).
        levels: Q (``Levels``), or None for the identity.
        lam: weight of the coupling term.
        iters: rounds of (z, alpha, coordinate sweep).
        binary: 1-bit codes in {-1, +1}.
        history: if given, the relaxed objective g (summed over channels) is appended after every update.
        narrow: codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; False: the full range from ``-2^(b-1)``.
        offset: ``K x R x C`` values added to the layer's output before Q (a residual block's
            shortcut: the target is then ``Q(conv + shortcut)``, the codes of the block output that
            the next layer sees); needs ``levels``. The objective is then
            ``||y - Q(z + offset)||^2 + lam ||z - (alpha X w + b)||^2``, minimised in z exactly
            by the shifted z-step.

    Returns:
        ``(q, alpha)``: integer codes ``K x C x D`` and per-channel scales ``K x C``.
    """
    if offset is not None and levels is None:
        raise LowbitError("tsq_fit: an offset needs levels (Q of the shifted output)")
    qmax = 1 if binary else 2 ** (bits - 1) - 1
    qmin = -qmax if binary or narrow else -qmax - 1
    q, alpha = init_codes(w, bits, binary, narrow)
    A = torch.bmm(X.transpose(1, 2), X)  # K x D x D
    diag = torch.diagonal(A, dim1=1, dim2=2)
    Xt = X.transpose(1, 2)

    def record(z: Tensor, qz: Tensor) -> None:
        if history is not None:
            history.append(relaxed_objective(X, y, bias, q, alpha, z, qz, lam).sum().item())

    for _ in range(iters):
        v = torch.bmm(X, (q * alpha.unsqueeze(-1)).transpose(1, 2)) + bias.unsqueeze(1)
        if offset is None:
            z, qz = _z_step(y, v, levels, lam)
        else:  # (y - Q(z + s))^2 + lam (z - v)^2: the plain z-step in u = z + s, around v + s
            u, qz = _z_step(y, v + offset, levels, lam)
            z = u - offset
        record(z, qz)
        t = torch.bmm(Xt, z - bias.unsqueeze(1)).transpose(1, 2)  # K x C x D: X^T (z - b) per channel
        Aq = torch.bmm(q, A)
        alpha = _alpha_step(q, t, Aq, qmin == -qmax)
        record(z, qz)
        _sweep(q, A, diag, Aq, t / alpha.unsqueeze(-1), qmin, qmax, binary)
        record(z, qz)
        alpha = _alpha_step(q, t, Aq, qmin == -qmax)
        record(z, qz)
    return q, alpha


# ---------------------------------------------------------------------------------------------
# Step 2 on a model: collecting X and y, installing the codes
# ---------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Ends a capture pass once the layers it watches have run."""


_ACTS = {"relu": (lambda t: torch.relu(t), None), "relu6": (lambda t: torch.clamp(t, 0, 6), 6.0)}


def _act_kind(mod: nn.Module) -> str | None:
    """``_ACTS`` key of an activation module (None: not one whose codes step 2 can model)."""
    if isinstance(mod, nn.ReLU):
        return "relu"
    if isinstance(mod, nn.ReLU6):
        return "relu6"
    return None


def _consumer_levels(consumer: nn.Module, act: str, dtype: torch.dtype, device: torch.device) -> Levels | None:
    """Q of a producer whose output reaches ``consumer``'s quantizer through ``act`` (None: not expressible)."""
    aq = consumer.input_quant
    if not isinstance(aq, ActQuantizer) or not aq.enabled or aq.signed or bool(aq.zero_point.ne(0).any()):
        return None
    _, qmax = aq.qrange
    step = aq.scale.item()
    # a plain unsigned quantizer is the sparse one whose threshold is half a step (ties aside)
    eps = aq.threshold.item() if isinstance(aq, SparseActQuantizer) else 0.5 * step
    return sparse_levels(eps, step, qmax, _ACTS[act][1], dtype, device)


@dataclass(frozen=True)
class _Route:
    """How a layer's output reaches a quantized layer's input codes: ``consumer.input_quant(act(out [+ s]))``.

    ``residual`` is ``(activation module, call index within a forward)`` when the output is first
    added to values ``s`` that do not depend on it (a residual block's shortcut) and then passes
    through that activation module; None when ``act(out)`` is the consumer's input itself.
    """

    consumer: str
    act: str
    residual: tuple[str, int] | None = None


@torch.no_grad()
def _find_routes(ref: nn.Module, names: list[str], x: Tensor, residual: bool = True) -> dict[str, _Route]:
    """The route (``_Route``) of every layer in ``names`` whose output reaches a quantized input, found on ``x``.

    Direct: a quantized layer's raw input equals ``act(out)`` exactly. Residual (``residual``; only
    for layers without a direct route): adding a random ``d`` to the layer's output changes the
    input of an activation-module call by exactly ``d`` (so that input is ``out + s`` with ``s``
    independent of the layer), and that call's output equals a quantized layer's raw input exactly.
    The consumer must have a quantizer that ``_consumer_levels`` can express.
    """
    layers = dict(quant_layers(ref))
    acts = [(n, m) for n, m in ref.named_modules() if _act_kind(m) is not None]

    def run(perturb: tuple[str, Tensor] | None = None) -> tuple[dict, dict, list]:
        outs: dict[str, Tensor] = {}
        inputs: dict[str, Tensor] = {}
        calls: list[tuple[str, int, Tensor, Tensor]] = []  # (act module, call index, input, output)
        count: dict[str, int] = {}
        pending: dict[str, Tensor] = {}

        def on_out(name: str) -> Any:
            def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
                if perturb is not None and perturb[0] == name:
                    return out + perturb[1]
                outs.setdefault(name, out.clone())  # an in-place activation rewrites it next
                return None
            return hook

        def on_in(name: str) -> Any:
            def hook(mod: nn.Module, args: tuple) -> None:
                if isinstance(args[0], Tensor):
                    inputs.setdefault(name, args[0].clone())
            return hook

        def act_in(name: str) -> Any:
            def hook(mod: nn.Module, args: tuple) -> None:
                pending[name] = args[0].clone()
            return hook

        def act_out(name: str) -> Any:
            def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
                k = count.get(name, 0)
                count[name] = k + 1
                calls.append((name, k, pending.pop(name), out.clone()))
            return hook

        handles = [layers[n].register_forward_hook(on_out(n)) for n in names]
        handles += [m.register_forward_pre_hook(on_in(n)) for n, m in layers.items()]
        handles += [m.register_forward_pre_hook(act_in(n)) for n, m in acts]
        handles += [m.register_forward_hook(act_out(n)) for n, m in acts]
        try:
            ref(x)
        finally:
            for h in handles:
                h.remove()
        return outs, inputs, calls

    outs, inputs, calls = run()
    order = list(layers)

    def consumer_of(value: Tensor, act: str, producer: str) -> str | None:
        for cname in order:
            xc = inputs.get(cname)
            if (cname != producer and xc is not None and xc.shape == value.shape and torch.equal(value, xc)
                    and _consumer_levels(layers[cname], act, torch.float64, value.device) is not None):
                return cname
        return None

    routes: dict[str, _Route] = {}
    gen = torch.Generator().manual_seed(0)
    for name in names:
        out = outs.get(name)
        if out is None:
            continue
        for act, (fn, _) in _ACTS.items():
            cname = consumer_of(fn(out), act, name)
            if cname is not None:
                routes[name] = _Route(cname, act)
                break
        if name in routes or not residual or not acts:
            continue
        scale = out.abs().max().item() or 1.0
        d = (torch.randn(out.shape, generator=gen) * 0.01 * scale).to(out)
        _, _, moved = run((name, d))
        for (rname, k, h, y), (_, _, h2, _) in zip(calls, moved):
            if h.shape != out.shape or not torch.allclose(h2 - h, d, rtol=1e-3, atol=1e-5 * scale):
                continue
            act = _act_kind(dict(acts)[rname])
            cname = consumer_of(y, act, name)
            if cname is not None:
                routes[name] = _Route(cname, act, (rname, k))
                break
    return routes


@dataclass
class _LayerData:
    """What step 2 needs of one layer: sampled positions per chunk, X rows, targets y, shortcut offsets, Q."""

    positions: list[Tensor | None]
    xs: list[Tensor]
    ys: list[Tensor]
    offsets: list[Tensor]
    route: _Route | None = None  # None: Q is the identity (the target is the layer's own output)

    def Y(self, groups: int) -> Tensor:
        return _by_group(torch.cat(self.ys, 0), groups)

    def mode(self) -> str:
        if self.route is None:
            return "linear"
        r = self.route
        return f"{r.act} -> {r.consumer}" if r.residual is None else f"{r.act}(+ shortcut) -> {r.consumer}"


def _by_group(rows: Tensor, groups: int) -> Tensor:
    """``R x (K C)`` output rows as ``K x R x C``."""
    return rows.reshape(rows.shape[0], groups, -1).permute(1, 0, 2)


def _gather_rows(t: Tensor, pos: Tensor | None) -> Tensor:
    """``(N * P) x C`` values of an ``N x C x ...`` output at flat positions ``pos`` (N x P; None: all)."""
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    if pos is None:
        return flat.transpose(1, 2).reshape(-1, flat.shape[1])
    return flat.gather(2, pos.unsqueeze(1).expand(-1, flat.shape[1], -1)).transpose(1, 2).reshape(-1, flat.shape[1])


def _act_call_hooks(model: nn.Module, on_call: Any) -> list:
    """Pre-hooks on every activation module calling ``on_call(name, call index, input)``; counts reset per forward."""
    count: dict[str, int] = {}

    def reset(mod: nn.Module, args: tuple) -> None:
        count.clear()

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, args: tuple) -> None:
            k = count.get(name, 0)
            count[name] = k + 1
            on_call(name, k, args[0])
        return fn

    handles = [model.register_forward_pre_hook(reset)]
    handles += [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if _act_kind(m) is not None]
    return handles


@torch.no_grad()
def _step1_targets(ref: nn.Module, names: list[str], calib: Tensor, samples: int, seed: int, device: torch.device,
                   keep_x: bool, residual: bool = False, chunk: int = 256) -> dict[str, _LayerData]:
    """One pass of the step-1 network over ``calib``: positions, targets (and X rows and shortcut
    offsets if ``keep_x``) of every layer.

    Q of a layer follows its route (``_find_routes``, on the first images): the codes of the
    consumer's input, reached through an activation alone or, for a residual block's last layer,
    through the sum with the shortcut and then the activation (``residual``); else the identity.
    """
    n = len(calib)
    layers = dict(quant_layers(ref))
    routes = _find_routes(ref, names, calib[:min(n, 16)].to(device), residual)
    data = {name: _LayerData([], [], [], [], routes.get(name)) for name in names}
    gens = {name: torch.Generator().manual_seed(seed + i) for i, name in enumerate(names)}
    outs: dict[str, Tensor] = {}
    by_consumer: dict[str, list[str]] = {}
    by_act: dict[tuple[str, int], list[str]] = {}
    for name, d in data.items():
        if d.route is not None:
            by_consumer.setdefault(d.route.consumer, []).append(name)
            if d.route.residual is not None:
                by_act.setdefault(d.route.residual, []).append(name)

    def on_layer(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            d = data[name]
            x = mod.input_quant(args[0])
            pos = None
            if layer_kind(mod).spatial > 0:
                total = output_positions(mod, x[:1])
                per_image = max(1, min(total, -(-samples // n)))
                if per_image < total:
                    pos = torch.rand(len(x), total, generator=gens[name]).argsort(1)[:, :per_image].to(x.device)
            d.positions.append(pos)
            if keep_x:
                d.xs.append(patch_rows(mod, x, pos).float().cpu())
            outs[name] = out.clone()  # an in-place activation (ReLU(inplace=True)) rewrites it next
        return hook

    def on_input(cname: str) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:
            for pname in by_consumer.get(cname, ()):
                d = data[pname]
                if len(d.ys) < len(d.positions):
                    d.ys.append(_gather_rows(mod.input_quant(args[0]), d.positions[-1]).float().cpu())
        return hook

    def on_act(rname: str, k: int, h: Tensor) -> None:
        for pname in by_act.get((rname, k), ()):
            d = data[pname]
            if keep_x and len(d.offsets) < len(d.positions):
                d.offsets.append(_gather_rows(h - outs[pname], d.positions[-1]).float().cpu())

    handles = [layers[nm].register_forward_hook(on_layer(nm)) for nm in names]
    handles += [layers[c].register_forward_pre_hook(on_input(c)) for c in by_consumer]
    if by_act:
        handles += _act_call_hooks(ref, on_act)
    try:
        for i in range(0, n, chunk):
            outs.clear()
            ref(calib[i:i + chunk].to(device))
            for name, d in data.items():  # identity Q: the layer's own output
                if len(d.ys) < len(d.positions):
                    if d.route is not None:
                        raise LowbitError(f"tsq: the consumer of layer {name} did not run on every batch")
                    d.ys.append(_gather_rows(outs[name], d.positions[-1]).float().cpu())
    finally:
        for h in handles:
            h.remove()
    return data


@torch.no_grad()
def _compensated_rows(model: nn.Module, name: str, calib: Tensor, positions: list[Tensor | None],
                      device: torch.device, route: _Route | None = None,
                      chunk: int = 256) -> tuple[list[Tensor], list[Tensor]]:
    """X rows of layer ``name`` in ``model`` (its earlier layers quantized) at the step-1 positions,
    and, for a residual route, the shortcut offsets ``s`` (activation input minus the layer's output)."""
    layer = dict(quant_layers(model))[name]
    residual = route.residual if route is not None else None
    rows: list[Tensor] = []
    offsets: list[Tensor] = []
    out: list[Tensor] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        rows.append(patch_rows(mod, mod.input_quant(args[0]), positions[len(rows)]).float().cpu())
        if residual is None:
            raise _Stop  # nothing after this layer's input is needed

    def post(mod: nn.Module, args: tuple, o: Tensor) -> None:
        out[:] = [o.clone()]

    def on_act(rname: str, k: int, h: Tensor) -> None:
        if (rname, k) == residual:
            offsets.append(_gather_rows(h - out[0], positions[len(offsets)]).float().cpu())
            raise _Stop

    handles = [layer.register_forward_pre_hook(pre)]
    if residual is not None:
        handles += [layer.register_forward_hook(post)] + _act_call_hooks(model, on_act)
    try:
        for i in range(0, len(calib), chunk):
            try:
                model(calib[i:i + chunk].to(device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return rows, offsets


@torch.no_grad()
def transformation_learning(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: TsqOptions,
                            names: list[str], log=print, progress: bool = True,
                            step1_weights: dict[str, Tensor] | None = None) -> list[dict]:
    """Step 2 on every layer in ``names`` (weights off, inputs as trained); installs the integer weights.

    Returns one record per layer: objective before/after (relative to ||y||^2), solve seconds, Q.
    ``step1_weights``, if given, receives each fitted layer's FP (step-1) weight.
    """
    device = torch.device(cfg.device)
    qmodel.eval().to(device)
    layers = dict(quant_layers(qmodel))
    # the step-1 network (FP weights, learned codes) gives the targets; with error compensation the
    # inputs X come from qmodel, whose earlier layers are quantized by then
    targets = _step1_targets(qmodel, [n for n in names if not layers[n].custom_forward], calib, opts.samples,
                             cfg.seed, device, keep_x=not opts.error_compensation, residual=opts.residual_targets)
    records = []
    dtype = torch.float64
    for i, name in enumerate(progress_bar(names, desc="tsq step 2", enable=progress)):
        layer = layers[name]
        wq = layer.weight_quant
        if layer.custom_forward:  # not known to compute conv(x, W): no least-squares fit on patches
            wq.calibrate(layer.weight, lp_search_range)
            continue
        start = time.perf_counter()
        d = targets.pop(name)
        xs, offsets = (_compensated_rows(qmodel, name, calib, d.positions, device, d.route)
                       if opts.error_compensation else (d.xs, d.offsets))
        captured = time.perf_counter() - start
        W = weight_rows(layer, layer.weight.detach().to(device=device, dtype=dtype))
        K, C, _ = W.shape
        X, Y, mode = torch.cat(xs, 1), d.Y(K), d.mode()
        r = d.route
        levels = None if r is None else _consumer_levels(layers[r.consumer], r.act, dtype, device)
        offset = (_by_group(torch.cat(offsets, 0), K).to(device=device, dtype=dtype)
                  if r is not None and r.residual is not None else None)
        bias = (layer.bias.detach().to(device=device, dtype=dtype) if layer.bias is not None
                else torch.zeros(K * C, dtype=dtype, device=device)).reshape(K, C)
        X, Y = X.to(device=device, dtype=dtype), Y.to(device=device, dtype=dtype)
        if levels is not None:
            levels = Levels(levels.lo.to(device), levels.hi.to(device), levels.value.to(device))
        q0, a0 = init_codes(W, wq.bits, wq.binary, wq.narrow)
        before = true_objective(X, Y, bias, q0, a0, levels, offset).sum().item()
        solve_start = time.perf_counter()
        q, alpha = tsq_fit(X, Y, bias, W, wq.bits, levels, opts.lam, opts.iters, wq.binary, narrow=wq.narrow,
                           offset=offset)
        solve = time.perf_counter() - solve_start
        after = true_objective(X, Y, bias, q, alpha, levels, offset).sum().item()
        norm = max(Y.pow(2).sum().item(), 1e-30)
        new_w = rows_to_weight(layer, q * alpha.unsqueeze(-1))
        group_of = scale_group_of_rows(layer)
        wq.scale.copy_(torch.zeros(wq.num_groups, dtype=dtype, device=device)
                       .index_copy_(0, group_of, alpha.reshape(-1)).to(wq.scale.dtype))
        wq.zero_point.zero_()
        if step1_weights is not None:
            step1_weights[name] = layer.weight.detach().clone()
        layer.weight.copy_(new_w.to(layer.weight.dtype))
        wq.enabled = True
        rec = {"layer": name, "target": mode, "rows": X.shape[1], "inputs": X.shape[2], "channels": K * C,
               "rel_error_init": before / norm, "rel_error": after / norm, "capture_s": captured, "solve_s": solve}
        records.append(rec)
        log(f"tsq step 2 {name}: {mode}, rel. error {rec['rel_error_init']:.4f} -> {rec['rel_error']:.4f} "
            f"({X.shape[1]} rows x {X.shape[2]} inputs x {K * C} channels, {solve:.2f} s)")
    # every remaining weight quantizer meant to be on (names) is on now
    return records


# ---------------------------------------------------------------------------------------------
# The QAT method
# ---------------------------------------------------------------------------------------------

def tsq_setup(qmodel: nn.Module, calib: Tensor, cfg: QuantConfig, opts: TsqOptions) -> None:
    if cfg.granularity != "channel":
        raise LowbitError("tsq fits one weight scale per output channel: use granularity='channel'")
    if not cfg.w_symmetric:
        raise LowbitError("tsq produces symmetric (zero-point free) weights: use w_symmetric=True")
    observers = mse_start(qmodel, calib, cfg)
    record = record_of(qmodel)
    weights = []
    for name, layer in quant_layers(qmodel):
        spec = record.declaration(name)
        if layer.weight_quant.enabled:
            if layer_kind(layer).transposed and layer.groups > 1:
                raise LowbitError(f"tsq: layer {name}: a grouped ConvTranspose2d shares each weight scale "
                                  "between conv groups, which TSQ's per-channel fit does not model")
            weights.append(name)
            layer.weight_quant.enabled = False  # step 1 trains full-precision weights
        aq = layer.input_quant
        if not aq.enabled:
            continue
        values = observers[name].values()
        if layer.role == "body" and not aq.signed and not bool(aq.zero_point.ne(0).any()) and aq.bits > 1:
            _, qmax = aq.qrange
            eps = positive_quantile(values, opts.sparsity)
            step = fit_sparse_step(values, eps, qmax, floor=opts.threshold_floor)
            # the declared sparse code book, its quantizer built from it and calibrated, then trained
            inp = sparse_input(spec.input)
            sparse = input_quantizer(inp, aq.scale.device)
            sparse.threshold.fill_(max(eps, opts.threshold_floor * step))
            sparse.scale.fill_(step)
            layer.input_quant = training_input_quantizer(inp, sparse, sparsity=opts.sparsity,
                                                         momentum=opts.threshold_momentum,
                                                         track=opts.track_threshold, floor=opts.threshold_floor)
        else:
            inp = settled_input(spec.input, aq.signed)
            layer.input_quant = training_input_quantizer(inp, aq, lsq_grad_scale=True)
        record.declared[name] = replace(spec, input=inp)
    record.method_state = weights  # the layers finalize fits, by name


def zero_share(qmodel: nn.Module, images: Tensor, batch_size: int = 256) -> dict[str, float]:
    """Share (%) of zero codes of every quantized input on ``images`` (TSQ's sparsity)."""
    zeros: dict[str, list[int]] = {}
    device = next(qmodel.parameters()).device

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, args: tuple, out: Tensor) -> None:
            z = zeros.setdefault(name, [0, 0])
            z[0] += int((out == 0).sum())
            z[1] += out.numel()
        return fn

    observe(qmodel, images, batch_size, device,
            [l.input_quant.register_forward_hook(hook(n)) for n, l in quant_layers(qmodel) if l.input_quant.enabled])
    return {n: 100.0 * z / max(t, 1) for n, (z, t) in zeros.items()}


def observe(qmodel: nn.Module, images: Tensor, batch_size: int, device: torch.device, handles: list[Any]) -> None:
    """Run ``images`` through ``qmodel`` (``evaluate.predict``: eval mode, no grad) for its forward ``handles``,
    then remove them."""
    try:
        predict(qmodel, images, batch_size, device)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def project_latent_weights(layer: nn.Module, fp: Tensor, margin: float = 0.02) -> None:
    """Latent weights for fine-tuning: the step-1 weight ``fp`` moved into the bin of its step-2 code.

    Step 2 leaves each weight at exactly ``code * scale``, the middle of its rounding bin, where an
    LSQ fine-tune must move it half a step before any code changes (with small learning rates none
    does: the fine-tune then only moves scales and biases). Clamping the step-1 weight into the bin
    ``((code - 1/2) scale, (code + 1/2) scale)`` (``margin`` inside its ends) keeps every code, so
    the fine-tune starts from the step-2 network exactly, while weights that step 1 wanted elsewhere
    sit near the edge towards which their FP value lies and flip after a small update.
    """
    wq = layer.weight_quant
    w = layer.weight
    s, _ = wq.channel_params(w.dim())
    s = s.to(w.dtype)
    fp = fp.to(device=w.device, dtype=w.dtype)
    if wq.binary:  # codes -1 / +1: the bins are the two half-lines
        pos = w >= 0
        lo = torch.where(pos, margin * s, torch.full_like(w, -math.inf))
        hi = torch.where(pos, torch.full_like(w, math.inf), -margin * s)
    else:
        codes = torch.round(w / s)
        lo, hi = (codes - 0.5 + margin) * s, (codes + 0.5 - margin) * s
    w.copy_(torch.minimum(torch.maximum(fp, lo), hi))


class _TrainBN(nn.Module):
    """A BatchNorm that a quantized layer's output passes through during the fine-tune (a forward hook).

    Initialised as the identity on the calibration images: its running statistics are the layer's
    output mean / variance there and ``gamma = sqrt(var + eps)``, ``beta = mean``, so that in eval
    mode it changes nothing and in train mode it re-normalises each channel by its batch statistics.
    """

    def __init__(self, channels: int, mean: Tensor, var: Tensor) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels).to(mean.device)
        with torch.no_grad():
            self.bn.running_mean.copy_(mean)
            self.bn.running_var.copy_(var)
            self.bn.weight.copy_(torch.sqrt(var + self.bn.eps))
            self.bn.bias.copy_(mean)

    def hook(self, mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return self.bn(out)


@torch.no_grad()
def insert_train_bn(qmodel: nn.Module, calib: Tensor, device: torch.device,
                    batch_size: int = 256) -> list[tuple[nn.Module, _TrainBN, Any]]:
    """Put a ``_TrainBN`` after every weight-quantized 2-d convolution of ``qmodel`` (identity in eval mode).

    Returns ``(layer, bn, hook handle)`` per layer, for ``fold_train_bn``. The BN is a child of the
    layer (``layer.tsq_bn``) so the optimizer trains its affine parameters.
    """
    layers = [(n, l) for n, l in quant_layers(qmodel)
              if l.weight_quant.enabled and layer_kind(l).spatial == 2 and not layer_kind(l).transposed]
    stats: dict[str, list[Tensor]] = {n: [torch.zeros(()), torch.zeros(()), torch.zeros(())] for n, _ in layers}

    def acc(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            o = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
            st = stats[name]
            st[0] = st[0] + o.sum(1)
            st[1] = st[1] + (o * o).sum(1)
            st[2] = st[2] + o.shape[1]
        return hook

    observe(qmodel, calib, batch_size, device, [l.register_forward_hook(acc(n)) for n, l in layers])
    out = []
    for name, layer in layers:
        total, sq, n = stats[name]
        mean = total / n
        var = (sq / n - mean * mean).clamp_min(0)
        bn = _TrainBN(layer.out_channels, mean.float().to(device), var.float().to(device))
        bn.train(layer.training)  # a new module trains by default: not in an eval-mode model
        layer.tsq_bn = bn
        out.append((layer, bn, layer.register_forward_hook(bn.hook)))
    return out


@torch.no_grad()
def fold_train_bn(entries: list[tuple[nn.Module, _TrainBN, Any]]) -> None:
    """Fold each ``_TrainBN`` (eval statistics) into its layer's per-channel weight scales and bias, exactly.

    The integer codes stay (negated in a channel whose BN multiplier turned negative, exact on the
    symmetric narrow grid), the scales take ``|gamma| / sqrt(var + eps)``, and the BN goes away.
    """
    for layer, tb, handle in entries:
        handle.remove()
        del layer.tsq_bn
        bn, wq = tb.bn, layer.weight_quant
        mult = (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).to(layer.weight.dtype)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(mult)
        new_bias = (bias - bn.running_mean) * mult + bn.bias
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)
        if wq.scale.numel() != mult.numel():
            raise LowbitError("tsq: the fine-tune's BN folds into per-channel weight scales only")
        codes = wq.quantize(layer.weight).int_value.to(layer.weight.dtype)
        dead = mult == 0  # the channel is the constant beta: codes 0, the scale kept positive
        sign = torch.where(mult < 0, -1.0, 1.0).to(codes.dtype)
        qmin, qmax = wq.limits(layer.weight.dim())
        # a full range's -2^(b-1) has no mirror: clipped (the narrow default is exact)
        codes = torch.where(per_output_channel(layer, dead), torch.zeros_like(codes),
                            (codes * per_output_channel(layer, sign)).clamp(qmin, qmax))
        wq.scale.copy_(torch.where(dead, wq.scale, wq.scale * mult.abs()).to(wq.scale.dtype))
        s, _ = wq.channel_params(layer.weight.dim())
        layer.weight.copy_(codes * s.to(codes.dtype))


def _finetune(qmodel: nn.Module, ctx: FinalizeContext, opts: TsqOptions,
              step1_weights: dict[str, Tensor] | None = None) -> dict:
    """Step 3: a short LSQ fine-tune of the quantized network (thresholds fixed).

    With ``opts.finetune_bn`` every quantized conv gets a BatchNorm for the fine-tune (identity at
    the start, folded into the per-channel scales at the end): without one (BN folded before
    training) the ternary network cannot re-normalise its channels, and the fine-tune gained almost
    nothing (LSQ itself, trained with BN folded, diverged: 9.4 against 87.7 top-1 on ResNet-20 W2A2).
    """
    from .engine import fit

    entries = insert_train_bn(qmodel, ctx.calib, ctx.device) if opts.finetune_bn else []
    record = record_of(qmodel)
    for name, layer in quant_layers(qmodel):
        spec = record.declaration(name)  # what setup declared: the trainers of those code books
        if step1_weights and name in step1_weights and layer.weight_quant.enabled and opts.project_latent:
            project_latent_weights(layer, step1_weights[name])
        if layer.weight_quant.enabled:
            layer.weight_quant = training_weight_quantizer(spec.weight, layer.weight_quant, weight=layer.weight)
        aq = layer.input_quant
        if aq.enabled:
            layer.input_quant = (training_input_quantizer(spec.input, aq, sparsity=opts.sparsity, track=False,
                                                          floor=opts.threshold_floor) if spec.input.kind == "sparse"
                                 else training_input_quantizer(spec.input, aq, lsq_grad_scale=True))
    tcfg = replace(ctx.train_config, epochs=opts.finetune_epochs, lr=opts.finetune_lr, scale_lr=None, checkpoint=None,
                   resume=False, overwrite=False, log_dir=None, max_steps=None, warmup_steps=0)
    summary = fit(qmodel, ctx.x_train, ctx.y_train, ctx.val, tcfg, {"method": "tsq-finetune"}, ctx.seed + 1,
                  ctx.device, progress=ctx.progress, log=ctx.log, teacher=ctx.teacher)
    commit_stand_ins(layer for _, layer in quant_layers(qmodel))
    fold_train_bn(entries)
    return summary


def tsq_finalize(qmodel: nn.Module, cfg: QuantConfig, opts: TsqOptions, ctx: FinalizeContext) -> QuantConfig:
    commit_stand_ins(layer for _, layer in quant_layers(qmodel))
    record = record_of(qmodel)
    names, record.method_state = record.method_state or [], None
    zeros_step1 = zero_share(qmodel, ctx.calib)
    step1_weights: dict[str, Tensor] = {}
    records = transformation_learning(qmodel, ctx.calib, cfg, opts, names, ctx.log, ctx.progress, step1_weights)
    report: dict[str, Any] = {"step2": records, "zero_share_step1": zeros_step1}
    if ctx.val is not None:  # the network after step 2 alone, before any fine-tune
        report["step2_val_acc"] = accuracy(qmodel, ctx.val[0], ctx.val[1], device=ctx.device)
    if opts.finetune_epochs:
        report["finetune"] = _finetune(qmodel, ctx, opts, step1_weights)["history"]
    report["zero_share"] = zero_share(qmodel, ctx.calib)
    record.tsq = report
    return cfg


register_qat_method("tsq", tsq_setup, tsq_finalize, TsqOptions,
                    "Two-Step Quantization: sparse activation codes, then per-layer low-bit weight fitting (TSQ)",
                    wants_context=True)
