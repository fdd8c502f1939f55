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


def reference_bitsplit(A: np.ndarray, B: np.ndarray, W: np.ndarray, bits: int, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """The straightforward per-channel, per-coordinate loop of the official code (slow)."""
    C, D = W.shape
    qmax = 2 ** (bits - 1) - 1
    Q = np.zeros_like(W)
    alphas = np.zeros(C)
    for ch in range(C):
        w, b = W[ch], B[ch]
        alpha = lloyd_weight_scale(torch.from_numpy(w[None]), qmax).item()
        q = np.clip(np.round(w / alpha), -qmax, qmax)
        planes = [np.sign(q) * ((np.abs(q).astype(np.int64) >> m) & 1) for m in range(bits - 1)]
        stitch = lambda ps: sum((2 ** m) * p for m, p in enumerate(ps))  # noqa: E731
        for _ in range(iters):
            q = stitch(planes)
            alpha = (q @ b) / (q @ A @ q)
            for m in reversed(range(bits - 1)):
                c = 2.0 ** m
                for n in range(D):
                    q = stitch(planes)
                    u = (A @ q)[n] - c * planes[m][n] * A[n, n]
                    target = (b[n] / alpha - u) / (c * A[n, n])
                    planes[m][n] = np.round(np.clip(target, -1, 1))
        q = stitch(planes)
        alphas[ch] = (q @ b) / (q @ A @ q)
        Q[ch] = q
    return Q, alphas


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fast_fit_equals_reference(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    D, C = 18, 8
    X = torch.randn(400, D, generator=gen, dtype=torch.float64)
    W = torch.randn(C, D, generator=gen, dtype=torch.float64) * 0.1
    Xq = X + 0.05 * torch.randn(400, D, generator=gen, dtype=torch.float64)  # a "quantized" input
    A = Xq.T @ Xq
    B = W @ (X.T @ Xq)
    t0 = time.perf_counter()
    q_ref, a_ref = reference_bitsplit(A.numpy(), B.numpy(), W.numpy(), bits, iters=3)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    q, alpha = bitsplit_fit(A[None], B[None], W[None], bits, torch.arange(C), C, iters=3)
    t_fast = time.perf_counter() - t0
    assert np.array_equal(q[0].numpy(), q_ref)
    assert np.allclose(alpha.numpy(), a_ref, rtol=1e-9)
    print(f"bitsplit fit, {C} channels x {D} inputs, {bits} bit: reference {t_ref * 1e3:.1f} ms, "
          f"fast {t_fast * 1e3:.1f} ms ({t_ref / t_fast:.1f}x)")


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
    assert alpha.shape == (2,)
    assert q.abs().max() <= 7


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
    x = torch.randn(64, 1, 12, 12)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = lowbit.quantize(net, x, w_bits=w_bits, a_bits=a_bits, method="bitsplit", quantize_all=True, samples=2000)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    ref, out = net(x), q(x)
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.5
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
    x = torch.randn(128, 1, 12, 12)
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
    x = torch.randn(64, 1, 12, 12)
    q = lowbit.quantize(net, x, w_bits=4, a_bits=8, method="bitsplit", fold_bn=False, bn_reestimate=True)
    assert not torch.allclose(q.bn.running_mean, net.bn.running_mean)
    assert torch.isfinite(q(x)).all()


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
