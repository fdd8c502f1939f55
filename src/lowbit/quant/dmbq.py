"""DMBQ: distribution-aware multi-bit quantization (seed 002, Zhao, Yue, Hu, CVPR 2021), pure functions.

A value is approximated by ``M`` binary bases, ``x ~ sum_i alpha_i b_i``:

* signed tensors (weights, inputs that go negative): ``b_i in {-1, +1}``; the ``2^M`` levels are
  every sign combination, a set symmetric about 0 (LQ-Net's form);
* non-negative tensors (inputs after ReLU): ``b_i in {0, 1}``, i.e. the sign bases shifted by
  ``sum_i alpha_i`` (``sum_i alpha_i (1 + s_i) / 2`` with ``s_i in {-1, +1}``), so the lowest level
  is exactly 0. ReLU outputs are about half zeros: a symmetric level set would spend half its
  levels on values that never occur and could not represent 0 exactly.

The alphas minimise the expected squared error ``E[(X - Q(X))^2]`` under the tensor's
distribution. ``fit_alphas`` solves that problem for weighted samples (nearest-level assignment,
then weighted least squares on the alphas, to convergence: an alternating fit); the shipped
table (``dmbq_table``) holds its solutions for a grid of distribution shapes, a generalized
Gaussian ``f(x) ~ exp(-|x|^beta)`` truncated at ``c`` times its own RMS, both for the magnitude of
a signed tensor and for the positive part of a non-negative one. ``shape_stats`` measures a
tensor's ``(r, c)``: ``r = E|x| / sqrt(E x^2)`` (which fixes beta) and ``c = max|x| / sqrt(E x^2)``;
the table is interpolated there and scaled by the tensor's RMS.

Everything here works row by row: a ``(R, n)`` tensor is ``R`` independent problems (output
channels of a weight, or one row for a whole activation tensor).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_BASES = 4  # 16 levels; beyond that a uniform grid is as good and far cheaper


def codes(m: int, signed: bool, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``2^m x m`` basis codes: row ``k`` holds bit ``i`` of ``k`` as ``+1/-1`` (signed) or ``1/0``."""
    k = torch.arange(2 ** m, device=device).unsqueeze(1)
    bits = ((k >> torch.arange(m, device=device)) & 1).to(dtype)
    return bits * 2 - 1 if signed else bits


def levels(alpha: Tensor, signed: bool) -> Tensor:
    """Every level ``sum_i alpha_i b_i``: ``(..., m)`` alphas -> ``(..., 2^m)`` levels, in code order."""
    return alpha @ codes(alpha.shape[-1], signed, alpha.device, alpha.dtype).T


def assign(x: Tensor, alpha: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Nearest-level assignment of each row of ``x`` (``(R, n)``) under that row's alphas (``(R, m)``).

    Returns the quantized values ``(R, n)`` and the code index of each element (``(R, n)`` int64;
    bit ``i`` of the index is the state of basis ``i``). Ties go to the lower level.
    """
    lv = levels(alpha, signed)  # (R, 2^m)
    sorted_lv, order = lv.sort(dim=1)
    mids = (sorted_lv[:, 1:] + sorted_lv[:, :-1]) / 2
    pos = torch.searchsorted(mids.contiguous(), x.contiguous())  # first midpoint >= x: lower level on ties
    q = sorted_lv.gather(1, pos)
    return q, order.gather(1, pos)


def planes_of(index: Tensor, m: int, signed: bool) -> Tensor:
    """The ``m`` binary planes of code indices: ``(m, *index.shape)``, ``+-1`` (signed) or ``0/1``."""
    bits = torch.stack([(index >> i) & 1 for i in range(m)])
    return bits * 2 - 1 if signed else bits


def canonical(alpha: Tensor, signed: bool) -> Tensor:
    """One representative of equivalent alphas: descending, and (signed) non-negative.

    Signed levels do not change when a base flips sign (``-alpha b = alpha (-b)``) or bases swap,
    so the table and tests compare alphas in this form.
    """
    a = alpha.abs() if signed else alpha
    return a.sort(dim=-1, descending=True).values


def uniform_alphas(top: Tensor, m: int, signed: bool) -> Tensor:
    """Alphas whose levels form a uniform grid from ``-top`` (signed; 0 unsigned) to ``top``: ``(R, m)``.

    Powers of two, ``alpha_i ~ 2^i``: the start point of the alternating fit (LQ-Net's initialisation).
    """
    p = 2.0 ** torch.arange(m, device=top.device, dtype=top.dtype)
    return top.unsqueeze(-1) * p / p.sum()


def alternate_step(x: Tensor, weight: Tensor | None, alpha: Tensor, signed: bool,
                   ridge: float = 1e-10) -> Tensor:
    """One alternating step: assign every sample to its nearest level, then weighted least squares.

    ``x`` and ``weight`` are ``(R, n)`` (``weight`` None: all ones); returns the new ``(R, m)``
    alphas. A basis that no sample distinguishes (singular normal equations) keeps a tiny ridge
    instead of blowing up; the ridge is at least a few units of the dtype's rounding (1e-10 of the
    trace vanishes when added to a float32 Gram matrix, which then stays exactly singular).
    """
    m = alpha.shape[-1]
    _, idx = assign(x, alpha, signed)
    cb = codes(m, signed, x.device, x.dtype)  # (2^m, m)
    # per-level mass and first moment: the normal equations need nothing else
    w = torch.ones_like(x) if weight is None else weight
    mass = torch.zeros(x.shape[0], 2 ** m, device=x.device, dtype=x.dtype).scatter_add_(1, idx, w)
    first = torch.zeros_like(mass).scatter_add_(1, idx, w * x)
    gram = (cb.T * mass.unsqueeze(1)) @ cb  # (R, m, m)
    rhs = first @ cb  # (R, m)
    scale = gram.diagonal(dim1=1, dim2=2).sum(-1, keepdim=True).clamp_min(1e-30)
    ridge = max(ridge, 16 * torch.finfo(x.dtype).eps)
    eye = torch.eye(m, device=x.device, dtype=x.dtype)
    return torch.linalg.solve(gram + ridge * scale.unsqueeze(-1) * eye, rhs)


def weighted_mse(x: Tensor, weight: Tensor | None, alpha: Tensor, signed: bool) -> Tensor:
    """Per-row (weighted) mean squared error of the nearest-level quantization."""
    q, _ = assign(x, alpha, signed)
    err = (x - q) ** 2
    if weight is None:
        return err.mean(1)
    return (err * weight).sum(1) / weight.sum(1).clamp_min(1e-30)


def fit_alphas(x: Tensor, m: int, signed: bool, weight: Tensor | None = None,
               init: Tensor | list[Tensor] | None = None,
               max_iters: int = 500, tol: float = 1e-9, starts: tuple[float, ...] = (1.0,),
               tops: tuple[float, ...] = ()) -> Tensor:
    """Alternating fit to convergence: assignment, least squares, until the alphas stop moving.

    ``x`` (``(R, n)`` samples, with ``weight`` the quadrature weights of a density, or None) gives
    ``R`` independent problems. The fit starts from ``init`` (``(R, m)``, or a list of such) or, per entry of
    ``starts``, from a uniform grid whose top level is that multiple of the row's max |x|, and
    also from a uniform grid with its top level at each of ``tops`` (absolute values), and
    keeps the least-error result per row. Returns canonical alphas (``canonical``), ``(R, m)``.
    """
    top = x.abs().amax(1).clamp_min(1e-30)
    if isinstance(init, Tensor):
        inits = [init]
    elif init is not None:
        inits = list(init)
    else:
        inits = [uniform_alphas(top * s, m, signed) for s in starts]
        inits += [uniform_alphas(torch.minimum(top, torch.full_like(top, t)), m, signed) for t in tops]
    best, best_err = None, None
    for alpha in inits:
        for _ in range(max_iters):
            new = alternate_step(x, weight, alpha, signed)
            moved = ((new - alpha).abs().amax(1) / top).max().item()
            alpha = new
            if moved < tol:
                break
        err = weighted_mse(x, weight, alpha, signed)
        if best is None:
            best, best_err = alpha, err
        else:
            better = err < best_err
            best = torch.where(better.unsqueeze(1), alpha, best)
            best_err = torch.where(better, err, best_err)
    return canonical(best, signed)


def shape_stats(x: Tensor, signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(r, c, rms)`` per row of ``x`` (``(R, n)``): the statistics the table is indexed by.

    Signed rows use ``|x|``; non-negative rows their positive elements only (the zeros are
    represented exactly by the lowest level and do not shape the others). ``r = E|x| / rms``,
    ``c = max|x| / rms``. A row without nonzero values gets ``rms = 0``.
    """
    a = x.abs() if signed else x.clamp_min(0)
    if signed:
        n = torch.full(a.shape[:1], a.shape[1], dtype=a.dtype, device=a.device)
    else:
        n = (a > 0).sum(1).to(a.dtype)
    n = n.clamp_min(1)
    mean = a.sum(1) / n
    rms = (a.pow(2).sum(1) / n).sqrt()
    safe = rms.clamp_min(1e-30)
    return mean / safe, a.amax(1) / safe, rms


# --- the generalized Gaussian family of the table -------------------------------------------


def gg_ratio(beta: float) -> float:
    """``E|x| / sqrt(E x^2)`` of the (untruncated) generalized Gaussian of shape ``beta``."""
    return math.exp(math.lgamma(2 / beta) - 0.5 * (math.lgamma(1 / beta) + math.lgamma(3 / beta)))


def gg_quadrature(beta: float, t: float, n: int = 4001, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Points and weights on ``(0, t]`` for the density ``exp(-x^beta)`` (normalised to sum 1).

    The points are ``t u^3`` for ``u`` uniform (dense near 0, where heavy-tailed shapes have a cusp).
    """
    u = (torch.arange(1, n + 1, dtype=dtype) - 0.5) / n
    x = t * u ** 3
    w = 3 * t * u ** 2 / n * torch.exp(-x ** beta)
    return x, w / w.sum()


def gg_truncation(beta: float, c: float, n: int = 4001) -> float:
    """The truncation point ``t`` at which ``t / rms`` of the truncated density equals ``c``.

    ``t / rms`` grows from ``sqrt(3)`` (t -> 0: uniform) without bound, so bisection on ``log t``
    finds it; a ``c`` beyond what the shape reaches before its tail mass is negligible is capped
    there (the untruncated shape).
    """
    def ratio(t: float) -> float:
        x, w = gg_quadrature(beta, t, n)
        return t / math.sqrt(float((w * x * x).sum()))

    lo, hi = math.log(1e-3), math.log((60.0) ** (1 / beta))  # exp(-60): no mass beyond hi
    if ratio(math.exp(hi)) <= c:
        return math.exp(hi)
    for _ in range(80):
        mid = (lo + hi) / 2
        if ratio(math.exp(mid)) < c:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def truncated_stats(x: Tensor, w: Tensor) -> tuple[float, float, float]:
    """``(r, c, rms)`` of a quadrature (the table's measured statistics of a node)."""
    rms = math.sqrt(float((w * x * x).sum()))
    return float((w * x).sum()) / rms, float(x.max()) / rms, rms
