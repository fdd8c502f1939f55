"""TensorRT entropy calibration (kl) and LAPQ: KL thresholds against a numpy brute force, Powell, end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.api import build_config
from lowbit.errors import LowbitError
from lowbit.graph.surgery import prepare
from lowbit.ptq.common import calibrate_inputs, calibrate_weights, observe_fp_inputs, quantizers_disabled
from lowbit.ptq.lapq import line_minimize, powell, subsample_observers
from lowbit.ptq.registry import get_method
from lowbit.quant.layers import quant_layers
from lowbit.quant.ranges import kl_divergences, kl_range, lp_search_range

from ..conftest import calib_tensor, make_model


# ------------------------------------------------------------------ numpy brute-force reference

def _smooth(c: np.ndarray, eps: float) -> np.ndarray | None:
    nz = c > 0
    if not nz.any():
        return None
    take = eps * (len(c) - nz.sum()) / nz.sum()
    return np.maximum(np.where(nz, c - take, eps), eps * 1e-3)


def _ref_kl(hist: np.ndarray, start: int, n: int, levels: int, eps: float = 1e-4) -> float:
    """KL(P || Q) of the window ``hist[start:start + n]``, written out bin by bin with numpy."""
    sliced = hist[start:start + n].astype(np.float64)
    p = sliced.copy()
    p[0] += hist[:start].sum()
    p[-1] += hist[start + n:].sum()
    chunk = (np.arange(n) * levels) // n
    mass = np.bincount(chunk, weights=sliced, minlength=levels)
    nonzero = np.bincount(chunk, weights=(p > 0).astype(float), minlength=levels)
    q = np.where(p > 0, mass[chunk] / np.maximum(nonzero[chunk], 1), 0.0)
    ps, qs = _smooth(p, eps), _smooth(q, eps)
    if qs is None:
        return math.inf
    ps, qs = ps / ps.sum(), qs / qs.sum()
    return float(np.sum(ps * np.log(ps / qs)))


def _ref_threshold_one_sided(a: np.ndarray, levels: int, bins: int = 2048) -> float:
    """TensorRT's loop over thresholds i = levels .. bins on the |x| histogram; the last minimum wins."""
    width = a.max() / bins
    hist = np.bincount(np.minimum((a / width).astype(np.int64), bins - 1), minlength=bins)
    hist[0] = hist[1]
    divs = [_ref_kl(hist, 0, i, levels) for i in range(levels, bins + 1)]
    best = len(divs) - 1 - int(np.argmin(divs[::-1]))
    return (levels + best) * width


# ------------------------------------------------------------------ KL histogram math

def test_kl_divergences_match_numpy_brute_force() -> None:
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 6, size=300) * (rng.random(300) < 0.6)
    starts = torch.tensor([0, 0, 5, 17, 100, 3, 140])
    lengths = torch.tensor([300, 16, 150, 40, 15, 200, 20])
    got = kl_divergences(torch.tensor(hist, dtype=torch.float64), starts, lengths, 15, block=3)
    want = [_ref_kl(hist, int(s), int(n), 15) for s, n in zip(starts, lengths)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_kl_divergence_of_an_empty_quantized_window_is_infinite() -> None:
    hist = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0])  # all mass beyond the window: Q is empty
    assert kl_divergences(hist, torch.tensor([0]), torch.tensor([4]), 2).item() == math.inf


def test_kl_threshold_clips_outliers_and_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    a = np.abs(rng.laplace(scale=1.0, size=50_000))
    a[:4] = 60.0  # a few huge outliers (the Laplace bulk ends near 11)
    levels = 2 ** 4  # unsigned 4-bit codes cover [0, T]
    ref = _ref_threshold_one_sided(a, levels)
    lo, hi = kl_range(torch.tensor(a, dtype=torch.float32).unsqueeze(0), bits=4, signed=False, symmetric=False)
    thr = hi.item()
    assert lo.item() == pytest.approx(a.min())
    assert thr < 20.0  # the outliers are clipped
    assert abs(thr - ref) / ref < 0.02
    # the TensorRT threshold of Laplace(1) at 4 bit keeps the bulk: well above the median |x|
    assert 3.0 < thr


def test_kl_threshold_of_a_uniform_distribution_is_its_max() -> None:
    u = torch.rand(1, 100_000, generator=torch.Generator().manual_seed(0))
    for bits in (4, 8):
        _, hi = kl_range(u, bits=bits, signed=False, symmetric=False)
        assert hi.item() > 0.97 * u.max().item()


def test_kl_signed_inputs_are_two_sided() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.distributions.Laplace(0.0, 1.0).sample((40_000,))
    x = torch.sign(torch.rand(40_000, generator=gen) - 0.5) * x.abs()
    x[:3] = torch.tensor([-50.0, 50.0, 45.0])
    row = x.unsqueeze(0)
    # symmetric signed codes: the threshold is the same on both sides and clips the outliers
    lo, hi = kl_range(row, bits=4, signed=True, symmetric=True, narrow=True)
    assert lo.item() == pytest.approx(-hi.item()) and 2.0 < hi.item() < 20.0
    # brute force over the same two-sided windows [B - i, B + i) of the sign-aware histogram
    bins, levels = 2048, 15
    width = 50.0 / bins
    hist = np.bincount(np.clip(((x.numpy().astype(np.float64) + 50.0) / width).astype(np.int64), 0, 2 * bins - 1),
                       minlength=2 * bins)
    hist[bins] = hist[bins + 1]
    cands = range(8, bins + 1, 1)
    divs = [_ref_kl(hist, bins - i, 2 * i, levels) for i in cands]
    ref = (8 + len(divs) - 1 - int(np.argmin(divs[::-1]))) * width
    assert abs(hi.item() - ref) / ref < 0.02
    # codes with a zero point: a clipped range that never reaches past the data
    skew = torch.cat([x.abs() * 2, -0.3 * torch.rand(5000, generator=gen)]).unsqueeze(0)
    lo, hi = kl_range(skew, bits=4, signed=False, symmetric=False)
    assert lo.item() == pytest.approx(skew.min().item()) and hi.item() < 0.5 * skew.max().item()


def test_flatten_zero_removes_the_relu_spike_bias() -> None:
    g = torch.randn(1, 60_000, generator=torch.Generator().manual_seed(3))
    relu = torch.relu(g)
    positive = g.abs()  # the same shape without the spike of exact zeros
    _, flat = kl_range(relu, bits=4, signed=False, symmetric=False)
    _, ref = kl_range(positive, bits=4, signed=False, symmetric=False)
    _, spiky = kl_range(relu, bits=4, signed=False, symmetric=False, flatten_zero=False)
    assert abs(flat.item() - ref.item()) / ref.item() < 0.1
    assert spiky.item() < 0.8 * flat.item()


def test_kl_range_options_are_checked() -> None:
    with pytest.raises(LowbitError):
        kl_range(torch.rand(1, 10), bits=4, signed=False, symmetric=False, bins=1)
    with pytest.raises(LowbitError):
        lowbit.quantize(make_model("resnet20"), calib_tensor(4), method="kl", bins=0)


# ------------------------------------------------------------------ derivative-free search

def test_line_minimize_finds_the_vertex_and_never_loses() -> None:
    a, fa = line_minimize(lambda t: (t - 0.73) ** 2 + 1.0, 0.73 ** 2 + 1.0, 0.1, 20)
    assert abs(a - 0.73) < 1e-3 and fa <= 1.0 + 1e-6
    a, fa = line_minimize(lambda t: (t + 2.0) ** 2, 4.0, 0.1, 30)  # minimum on the negative side
    assert abs(a + 2.0) < 1e-2
    a, fa = line_minimize(lambda t: t * t, 0.0, 0.1, 5)  # already at the minimum
    assert (a, fa) == (0.0, 0.0)
    assert line_minimize(lambda t: -t, 0.0, 0.1, 0) == (0.0, 0.0)


def test_powell_minimises_a_coupled_quadratic_monotonically() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    hess = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    centre = torch.randn(6, generator=gen, dtype=torch.float64)
    seen: list[float] = []

    def f(x: torch.Tensor) -> float:
        v = float((x - centre) @ hess @ (x - centre))
        seen.append(v)
        return v

    x, fx, evals = powell(f, torch.zeros(6), iters=12, line_evals=12)
    assert evals == len(seen) and fx == min(seen)
    assert fx < 1e-3 * seen[0]
    capped = powell(f, torch.zeros(6), iters=50, line_evals=12, max_evals=30)
    assert capped[2] <= 30


# ------------------------------------------------------------------ LAPQ

def _kl_to_fp(qmodel, images) -> float:
    with torch.no_grad():
        out = qmodel(images).double().log_softmax(1)
        with quantizers_disabled(qmodel):
            ref = qmodel(images).double().log_softmax(1)
    return F.kl_div(out, ref, log_target=True, reduction="batchmean").item()


LAPQ_FAST = {"iters": 1, "p_count": 3, "line_evals": 4, "candidates": 20, "shrink": 0.04, "lp_samples": 2000}


def test_lapq_is_never_worse_than_its_lp_start() -> None:
    fp = make_model("resnet20")
    calib = calib_tensor(24, seed=5)
    cfg, options = build_config(3, 3, {"granularity": "tensor", **LAPQ_FAST, "max_evals": 80})
    spec = get_method("lapq")
    opts = spec.make_options(options)
    qmodel, _ = prepare(fp, cfg, calib[:2])
    report = spec.handler(qmodel, calib, cfg, opts)
    assert sorted(report["p_sweep"]) == [2.0, 3.0, 4.0]
    assert 2.0 <= report["p"] <= 4.0 and report["start_loss"] <= min(report["p_sweep"].values())
    assert lowbit.record_of(qmodel).lapq is report
    # the start, rebuilt independently: Lp-optimal clips at the chosen p
    start, _ = prepare(fp, cfg, calib[:2])
    calibrate_weights(start, lp_search_range, p=report["p"], candidates=20, shrink=0.04)
    observers = subsample_observers(observe_fp_inputs(start, calib, cfg), opts.lp_samples, cfg.seed)
    calibrate_inputs(start, observers, lp_search_range, p=report["p"], candidates=20, shrink=0.04)
    start_loss = _kl_to_fp(start, calib)  # all 24 images: fewer than loss_images
    assert start_loss == pytest.approx(report["start_loss"], rel=1e-6)
    final_loss = _kl_to_fp(qmodel, calib)
    assert final_loss == pytest.approx(report["final_loss"], rel=1e-6)
    assert final_loss < start_loss
    # only clipping values moved: weights are the FP (folded) ones
    for (_, a), (_, b) in zip(quant_layers(qmodel), quant_layers(start)):
        assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("method,options", [("kl", {"bins": 256}), ("lapq", {**LAPQ_FAST, "p_count": 2, "max_evals": 12})])
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_end_to_end_round_trip_and_determinism(method: str, options: dict, name: str, tmp_path) -> None:
    fp = make_model(name)
    calib, held = calib_tensor(16, seed=7), calib_tensor(8, seed=8)
    q = lowbit.quantize(fp, calib, 4, 4, method=method, granularity="tensor", **options)
    again = lowbit.quantize(fp, calib, 4, 4, method=method, granularity="tensor", **options)
    with torch.no_grad():
        out = q(held)
        assert torch.equal(out, again(held))
        loaded = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), model=fp)
        assert torch.equal(loaded(held), out)
    assert q.lowbit_info["method"] == method and q.lowbit_info["options"]["iters" if method == "lapq" else "bins"] \
        == options["iters" if method == "lapq" else "bins"]


def test_kl_weights_use_max_abs_scales() -> None:
    fp = make_model("resnet20")
    q = lowbit.quantize(fp, calib_tensor(8), 4, 4, method="kl", granularity="channel", bins=128)
    for _, layer in quant_layers(q):
        wq = layer.weight_quant
        qmax = wq.qrange[1]
        want = (layer.weight.detach().abs().flatten(1).amax(1) / qmax).clamp_min(1e-8)
        torch.testing.assert_close(wq.scale, want)


def test_methods_are_registered_and_options_checked() -> None:
    assert {"kl", "lapq"} <= set(lowbit.methods())
    model, calib = make_model("resnet20"), calib_tensor(4)
    for bad in ({"p_min": 3.0, "p_max": 2.0}, {"line_evals": 0}, {"loss_images": 0}, {"shrink": 1.5}):
        with pytest.raises(LowbitError):
            lowbit.quantize(model, calib, method="lapq", **bad)


def test_subsampled_observers_keep_the_extremes_and_the_seed() -> None:
    fp = make_model("resnet20")
    cfg, _ = build_config(4, 4, {})
    qmodel, _ = prepare(fp, cfg, calib_tensor(2))
    full = observe_fp_inputs(qmodel, calib_tensor(8), cfg)
    small = subsample_observers(full, 100, seed=0)
    again = subsample_observers(full, 100, seed=0)
    for name, obs in full.items():
        v = small[name].values()
        assert len(v) == 102 and v.min() == obs.lo and v.max() == obs.hi
        assert torch.equal(v, again[name].values())
    assert subsample_observers(full, 0, seed=0) is full
