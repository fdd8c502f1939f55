"""Bit-Split: plane split/stitch, exact ternary coordinate updates, fast == slow reference."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.errors import LowbitError
from lowbit.ptq.bitsplit import bitsplit_fit, lloyd_weight_scale, sweep_plane
from lowbit.quant.bitplanes import split_planes, stitch_planes


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_planes_round_trip(bits: int, seed: int) -> None:
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (37,), generator=torch.Generator().manual_seed(seed)).double()
    planes = split_planes(q, bits)
    assert planes.shape == (bits - 1, 37)
    assert set(planes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(stitch_planes(planes), q)


def test_two_bit_weights_are_one_ternary_plane() -> None:
    planes = split_planes(torch.tensor([-1.0, 0.0, 1.0]), 2)
    assert planes.shape == (1, 3)
    with pytest.raises(LowbitError):
        split_planes(torch.tensor([2.0]), 2)


def _objective(A: torch.Tensor, b: torch.Tensor, alpha: float, q: torch.Tensor) -> float:
    return float(alpha ** 2 * q @ A @ q - 2 * alpha * q @ b)


def test_coordinate_update_is_the_exact_ternary_minimiser() -> None:
    gen = torch.Generator().manual_seed(0)
    D, C = 6, 5
    X = torch.randn(50, D, generator=gen, dtype=torch.float64)
    A = (X.T @ X).unsqueeze(0)
    B = torch.randn(1, C, D, generator=gen, dtype=torch.float64) * 10
    alpha = torch.rand(1, C, generator=gen, dtype=torch.float64) + 0.5
    planes = torch.randint(-1, 2, (2, 1, C, D), generator=gen).double()
    for m in (1, 0):
        c = float(2 ** m)
        before = planes.clone()
        q = stitch_planes(planes)
        Aq = torch.bmm(q, A)
        # one sweep over the first coordinate only: compare with brute force over {-1, 0, 1}
        sweep_plane(planes[m], c, A, torch.diagonal(A, dim1=1, dim2=2), Aq, B / alpha.unsqueeze(-1), binary=False)
        # the first coordinate is updated first, with every other coordinate still at its old value
        for ch in range(C):
            best = None
            for t in (-1.0, 0.0, 1.0):
                trial = before.clone()
                trial[m, 0, ch, 0] = t
                val = _objective(A[0], B[0, ch], float(alpha[0, ch]), stitch_planes(trial)[0, ch])
                best = (val, t) if best is None or val < best[0] - 1e-9 else best
            assert planes[m, 0, ch, 0].item() == best[1]
        # the incrementally kept A q matches a fresh product
        assert torch.allclose(Aq, torch.bmm(stitch_planes(planes), A), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# An independent Bit-Split, written from the paper in plain numpy: no lowbit helper is called
# (own Lloyd initialisation, own plane split/stitch, and every coordinate update found by
# evaluating the objective at each allowed value instead of by the closed-form rounding).
# ---------------------------------------------------------------------------------------------

def _np_split(q: np.ndarray, bits: int) -> list[np.ndarray]:
    """Ternary planes ``t_m = sign(q) * (bit m of |q|)``, m = 0 .. bits - 2."""
    mag = np.abs(q).astype(np.int64)
    return [np.sign(q) * ((mag >> m) & 1) for m in range(bits - 1)]


def _np_stitch(planes: list[np.ndarray]) -> np.ndarray:
    return sum(float(2 ** m) * t for m, t in enumerate(planes))


def _np_lloyd(w: np.ndarray, qmax: int) -> float:
    """Alternate q = clip(round(w / a)), a = <w, q> / <q, q> from a = max|w| / qmax until q is fixed."""
    a, prev = np.abs(w).max() / qmax, None
    for _ in range(1000):
        q = np.clip(np.round(w / a), -qmax, qmax)
        if prev is not None and np.array_equal(q, prev):
            return a
        new = (w @ q) / (q @ q)
        a, prev = (new if new > 0 else a), q
    raise AssertionError("the Lloyd iteration did not settle")


def independent_bitsplit(A: np.ndarray, B: np.ndarray, W: np.ndarray, bits: int, group_of: np.ndarray,
                         n_groups: int, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """min over a_g > 0 and integer codes q_c of sum_c a_g(c)^2 q_c^T A q_c - 2 a_g(c) q_c^T b_c.

    Bit-Split's alternation: each round sets every group's scale to its closed-form optimum for
    the current codes, then visits the planes (most significant first) and, within a plane, each
    coordinate n of each channel, setting it to whichever allowed value ({-1, 0, 1}; {-1, 1} at 1
    bit) gives the lowest objective with everything else fixed (ties: the smaller magnitude).
    """
    C, D = W.shape
    binary = bits == 1
    qmax = 1 if binary else 2 ** (bits - 1) - 1
    alpha = np.array([np.abs(W[group_of == g]).mean() if binary else _np_lloyd(W[group_of == g].reshape(-1), qmax)
                      for g in range(n_groups)])
    if binary:
        planes = [np.where(W >= 0, 1.0, -1.0)]
    else:
        planes = _np_split(np.clip(np.round(W / alpha[group_of][:, None]), -qmax, qmax), bits)
    candidates = (1.0, -1.0) if binary else (0.0, -1.0, 1.0)

    def best_scales(q: np.ndarray) -> np.ndarray:
        num, den = np.zeros(n_groups), np.zeros(n_groups)
        for c in range(C):
            num[group_of[c]] += q[c] @ B[c]
            den[group_of[c]] += q[c] @ A @ q[c]
        a = num / np.maximum(den, 1e-30)
        return np.where(a > 0, a, 1e-12)

    for _ in range(iters):
        alpha = best_scales(_np_stitch(planes))
        for m in reversed(range(len(planes))):
            for n in range(D):
                for c in range(C):
                    a, best = alpha[group_of[c]], None
                    for t in candidates:
                        planes[m][c, n] = t
                        q = _np_stitch([p[c] for p in planes])
                        f = a * a * (q @ A @ q) - 2 * a * (q @ B[c])
                        if best is None or f < best[0]:
                            best = (f, t)
                    planes[m][c, n] = best[1]
    q = _np_stitch(planes)
    return q, best_scales(q)


def _problem(D: int, C: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram matrices of a layer with D inputs and C outputs, fitted on a perturbed ("quantized") input."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(300, D, generator=gen, dtype=torch.float64)
    W = torch.randn(C, D, generator=gen, dtype=torch.float64) * 0.1
    Xq = X + 0.05 * torch.randn(300, D, generator=gen, dtype=torch.float64)
    return Xq.T @ Xq, W @ (X.T @ Xq), W


@pytest.mark.parametrize("D", [1, 2, 3, 9])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fast_fit_equals_independent_reference(bits: int, D: int) -> None:
    C = 8
    A, B, W = _problem(D, C, seed=10 * bits + D)
    t0 = time.perf_counter()
    q_ref, a_ref = independent_bitsplit(A.numpy(), B.numpy(), W.numpy(), bits, np.arange(C), C, iters=3)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    q, alpha = bitsplit_fit(A[None], B[None], W[None], bits, torch.arange(C), C, iters=3, binary=bits == 1)
    t_fast = time.perf_counter() - t0
    assert np.array_equal(q[0].numpy(), q_ref)
    assert np.allclose(alpha.numpy(), a_ref, rtol=1e-12, atol=0)
    print(f"bitsplit fit, {C} channels x {D} inputs, {bits} bit: reference {t_ref * 1e3:.1f} ms, "
          f"fast {t_fast * 1e3:.1f} ms ({t_ref / t_fast:.1f}x)")


def _brute_force_optimum(A: np.ndarray, b: np.ndarray, bits: int) -> float:
    """min over a > 0 and every code vector of a^2 q^T A q - 2 a q^T b (= -(q^T b)^2 / q^T A q)."""
    qmax = 2 ** (bits - 1) - 1
    levels = (-1.0, 1.0) if bits == 1 else tuple(float(v) for v in range(-qmax, qmax + 1))
    best = 0.0
    for q in itertools.product(levels, repeat=len(b)):
        q = np.array(q)
        num, den = q @ b, q @ A @ q
        if num > 0 and den > 0:
            best = min(best, -num * num / den)
    return best


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fit_against_the_brute_force_optimum_on_tiny_layers(bits: int) -> None:
    """1 to 3 weights per channel: every code vector enumerated.

    Bit-Split is a local method (coordinate descent); it must never beat the true optimum (its
    scale is the exact one for its codes), never end above its own starting point (every update
    is exact), find the optimum with one weight per channel or binary codes (nothing to get stuck
    on), and find it on most channels of the others.
    """
    C = 16
    qmax = 1 if bits == 1 else 2 ** (bits - 1) - 1
    found, gaps = 0, []
    for D in (1, 2, 3):
        A, B, W = _problem(D, C, seed=100 + 10 * bits + D)
        q, alpha = bitsplit_fit(A[None], B[None], W[None], bits, torch.arange(C), C, iters=3, binary=bits == 1)
        An, Bn, Wn = A.numpy(), B.numpy(), W.numpy()
        for c in range(C):
            qc, a = q[0, c].numpy(), alpha[c].item()
            assert np.abs(qc).max() <= qmax
            fit = a * a * (qc @ An @ qc) - 2 * a * (qc @ Bn[c])
            assert a == pytest.approx((qc @ Bn[c]) / (qc @ An @ qc), rel=1e-12)  # the exact scale for its codes
            # the starting point: rounding with the Lloyd scale (sign and mean |w| at 1 bit), best scale
            a0 = np.abs(Wn[c]).mean() if bits == 1 else _np_lloyd(Wn[c], qmax)
            q0 = np.where(Wn[c] >= 0, 1.0, -1.0) if bits == 1 else np.clip(np.round(Wn[c] / a0), -qmax, qmax)
            start = -(q0 @ Bn[c]) ** 2 / (q0 @ An @ q0) if q0 @ Bn[c] > 0 else 0.0
            best = _brute_force_optimum(An, Bn[c], bits)
            tol = 1e-12 * abs(best)
            assert best - tol <= fit <= start + tol, (D, c)
            optimal = fit <= best + tol
            if D == 1 or bits == 1:
                assert optimal, (D, c)
            found += optimal
            gaps.append((fit - best) / abs(best))
    # elsewhere: the optimum on most channels, within 1% of it on average
    assert found >= 0.6 * len(gaps) and sum(gaps) / len(gaps) < 0.01, (found, len(gaps), max(gaps))


def test_fit_reduces_output_error_against_rounding() -> None:
    gen = torch.Generator().manual_seed(1)
    D, C = 27, 16
    # correlated inputs, as neighbouring pixels of conv patches are: output fitting pays off there
    mix = torch.eye(D, dtype=torch.float64) + 0.5 * torch.randn(D, D, generator=gen, dtype=torch.float64)
    X = torch.randn(2000, D, generator=gen, dtype=torch.float64) @ mix
    W = torch.randn(C, D, generator=gen, dtype=torch.float64)
    A, B = X.T @ X, W @ (X.T @ X)
    q, alpha = bitsplit_fit(A[None], B[None], W[None], 3, torch.arange(C), C, iters=4)
    fitted = (q[0] * alpha.unsqueeze(1))
    scale = lloyd_weight_scale(W, 3).unsqueeze(1)  # the best plain rounding (weight-error optimal)
    rounded = torch.clamp(torch.round(W / scale), -3, 3) * scale
    err = lambda w: ((X @ W.T - X @ w.T) ** 2).mean().item()  # noqa: E731
    assert err(fitted) < 0.8 * err(rounded)
    assert q.abs().max() <= 3


def test_per_group_scales_are_shared() -> None:
    gen = torch.Generator().manual_seed(2)
    D, C = 9, 8
    X = torch.randn(500, D, generator=gen, dtype=torch.float64)
    W = torch.randn(C, D, generator=gen, dtype=torch.float64)
    A, B = X.T @ X, W @ (X.T @ X)
    group_of = torch.arange(2).repeat_interleave(4)
    q, alpha = bitsplit_fit(A[None], B[None], W[None], 4, group_of, 2, iters=3)
    assert alpha.shape == (2,) and q.abs().max() <= 7
    # the same codes and scales as the independent reference with shared scales
    q_ref, a_ref = independent_bitsplit(A.numpy(), B.numpy(), W.numpy(), 4, group_of.numpy(), 2, iters=3)
    assert np.array_equal(q[0].numpy(), q_ref)
    assert np.allclose(alpha.numpy(), a_ref, rtol=1e-12, atol=0)
    # each group's scale is the joint optimum over its four channels' codes, not any one channel's
    qn = q[0].numpy()
    for g in range(2):
        rows = range(4 * g, 4 * g + 4)
        joint = sum(qn[c] @ B[c].numpy() for c in rows) / sum(qn[c] @ A.numpy() @ qn[c] for c in rows)
        assert alpha[g].item() == pytest.approx(joint, rel=1e-12)
        own = [(qn[c] @ B[c].numpy()) / (qn[c] @ A.numpy() @ qn[c]) for c in rows]
        assert min(abs(o / joint - 1) for o in own) > 1e-3
    # per channel the fit has eight distinct scales: the grouping is what made them two
    _, alpha_c = bitsplit_fit(A[None], B[None], W[None], 4, torch.arange(C), C, iters=3)
    assert len(alpha_c.unique()) == C


def _cnn() -> torch.nn.Module:
    class Net(torch.nn.Module):  # not in the zoo: grouped conv, concat, pooling, ReLU6, linear
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.b = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.dw = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
            self.fc = torch.nn.Linear(16, 5)

        def forward(self, x):
            x = torch.relu(self.bn(self.a(x)))
            y = torch.nn.functional.relu6(self.b(x))
            x = torch.cat([x, y], 1)
            x = self.dw(x)
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    net.bn.running_mean.uniform_(-0.2, 0.2)
    net.bn.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (2, 8), (3, 3)])
def test_bitsplit_on_a_non_zoo_cnn_exports_exact_integers(tmp_path, w_bits: int, a_bits: int) -> None:
    from lowbit.deploy import read_artifact, unpack_codes

    net = _cnn()
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    held = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = lowbit.quantize(net, x, w_bits=w_bits, a_bits=a_bits, method="bitsplit", quantize_all=True, samples=2000)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        ref = net(held)
        err = lambda m: ((m(held) - ref).norm() / ref.norm()).item()  # noqa: E731
        baselines = [err(lowbit.quantize(net, x, w_bits=w_bits, a_bits=a_bits, method=m, quantize_all=True))
                     for m in ("minmax", "mse")]
        # held-out images: 2.2-4.0% relative output error here, 0.7x (4 bit) to 0.2x (2 bit) the
        # better of minmax and mse
        assert err(q) < 0.06 and err(q) < 0.8 * min(baselines), (err(q), baselines)
    path = lowbit.export(q, tmp_path / "m.lowbit")
    loaded = lowbit.load(path, model=net)
    assert torch.equal(loaded(x), q(x))
    manifest, tensors = read_artifact(path)
    qmax = 2 ** (w_bits - 1) - 1
    for name, spec in manifest["layers"].items():
        n = int(np.prod(spec["weight_shape"]))
        codes = unpack_codes(tensors[f"{name}.weight.codes"], spec["w_bits"], spec["w_qmin"], n)
        assert codes.abs().max() <= qmax and spec["w_bits"] == w_bits


def test_bitsplit_beats_minmax_at_low_bits() -> None:
    net = _cnn()
    x = torch.randn(128, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    ref = net(x)
    err = {}
    for method in ("minmax", "bitsplit"):
        q = lowbit.quantize(net, x, w_bits=3, a_bits=4, method=method, quantize_all=True)
        err[method] = ((q(x) - ref).norm() / ref.norm()).item()
    assert err["bitsplit"] < err["minmax"]


def test_bitsplit_options_are_checked() -> None:
    net = _cnn()
    x = torch.randn(8, 1, 12, 12)
    with pytest.raises(LowbitError, match="act_method"):
        lowbit.quantize(net, x, method="bitsplit", act_method="nope")
    with pytest.raises(LowbitError, match="fold_bn"):
        lowbit.quantize(net, x, method="bitsplit", bn_reestimate=True)
    with pytest.raises(LowbitError, match="symmetric"):
        lowbit.quantize(net, x, method="bitsplit", w_symmetric=False)


def test_bn_reestimation_runs_on_unfolded_bn() -> None:
    net = _cnn()
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    q = lowbit.quantize(net, x, w_bits=4, a_bits=8, method="bitsplit", fold_bn=False, bn_reestimate=True)
    # the statistics are those of the quantized network's own BN input over the calibration set
    # (one batch of 64: plain mean and unbiased variance), not the FP network's
    seen = []
    handle = q.bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        q(x)
    handle.remove()
    mean, var = seen[0].mean((0, 2, 3)), seen[0].var((0, 2, 3), unbiased=True)
    assert torch.allclose(q.bn.running_mean, mean, rtol=1e-4, atol=1e-6)
    assert torch.allclose(q.bn.running_var, var, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(mean, net.bn.running_mean, atol=1e-2)
    assert not q.bn.training and q.bn.momentum == net.bn.momentum


def test_bias_correction_on_biasless_convs_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 3, bias=False), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.randn(32, 1, 8, 8)
    net(x)
    q = lowbit.quantize(net, x, w_bits=3, a_bits=4, method="bitsplit")
    assert q[2].bias is not None and net[2].bias is None
    loaded = lowbit.load(lowbit.export(q, tmp_path / "m.lowbit"), model=net)
    assert torch.equal(loaded(x), q(x))
