"""DMBQ math: levels, nearest-level assignment, the offline table against brute force, the STE."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lowbit.quant import dmbq
from lowbit.quant.dmbq_quantizers import DmbqAct, DmbqWeight
from lowbit.quant.dmbq_table import BETAS, CLIPS, build_table, shipped_table, table_alphas
from lowbit.quant.quantizer import ActQuantizer, WeightQuantizer


def gg_sample(beta: float, n: int, seed: int) -> torch.Tensor:
    """``n`` draws of the generalized Gaussian ``exp(-|x|^beta)``: sign * Gamma(1/beta)^(1/beta)."""
    rng = np.random.default_rng(seed)
    mag = rng.gamma(1 / beta, 1.0, n) ** (1 / beta)
    return torch.tensor(np.where(rng.random(n) < 0.5, -mag, mag), dtype=torch.float64)


def test_levels_are_every_sign_combination():
    alpha = torch.tensor([[1.5, 0.4, 0.1]])
    got = sorted(dmbq.levels(alpha, True)[0].tolist())
    want = sorted(sum(s * a for s, a in zip(signs, (1.5, 0.4, 0.1)))
                  for signs in itertools.product((-1, 1), repeat=3))
    assert got == pytest.approx(want)
    unsigned = sorted(dmbq.levels(torch.tensor([[1.0, 0.3]]), False)[0].tolist())
    assert unsigned == pytest.approx([0.0, 0.3, 1.0, 1.3])  # {0,1} bases: 0 is a level


def test_assign_is_nearest_level_and_planes_rebuild_it():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 500, generator=gen)
    alpha = torch.tensor([[1.0, 0.5], [0.9, 0.2], [2.0, 1.1]])
    for signed in (True, False):
        q, idx = dmbq.assign(x, alpha, signed)
        lv = dmbq.levels(alpha, signed)
        brute = (x.unsqueeze(-1) - lv.unsqueeze(1)).abs().min(-1).values
        assert torch.allclose((x - q).abs(), brute)
        planes = dmbq.planes_of(idx, 2, signed).to(x.dtype)  # (m, R, n)
        assert torch.allclose(torch.einsum("mrn,rm->rn", planes, alpha), q)


def brute_force_m2(x: torch.Tensor, signed: bool) -> float:
    """Least MSE over a 60 x 60 grid of (alpha_1 >= alpha_2), refined twice around the best cell."""
    top = float(x.abs().max()) if signed else float(x.max())
    lo, hi = 0.0, top
    best = float("inf")
    for _ in range(3):
        grid = torch.linspace(lo, hi, 60, dtype=torch.float64)
        a1, a2 = torch.meshgrid(grid, grid, indexing="ij")
        alphas = torch.stack([a1.reshape(-1), a2.reshape(-1)], 1)
        alphas = alphas[alphas[:, 0] >= alphas[:, 1]]
        err = dmbq.weighted_mse(x.unsqueeze(0).expand(len(alphas), -1), None, alphas, signed)
        i = int(err.argmin())
        best = min(best, float(err[i]))
        step = (hi - lo) / 59
        lo = max(0.0, float(alphas[i].min()) - 2 * step)
        hi = float(alphas[i].max()) + 2 * step
    return best


@pytest.mark.parametrize("beta", [0.7, 1.0, 2.0])
def test_table_matches_brute_force_two_bases(beta):
    """On sampled data the table's alphas are within 2% of the best (alpha_1, alpha_2) by grid search."""
    x = gg_sample(beta, 2000, seed=int(beta * 10))
    for signed, data in ((True, x), (False, x.clamp_min(0))):
        table = table_alphas(data.unsqueeze(0).float(), 2, signed).double()
        err = float(dmbq.weighted_mse(data.unsqueeze(0), None, table, signed)[0])
        assert err <= 1.02 * brute_force_m2(data, signed), (beta, signed)


@pytest.mark.parametrize("m", [1, 3, 4])
def test_table_matches_multistart_solve(m):
    """More bases: within 3% of the alternating fit to convergence from many starts on the sample."""
    x = gg_sample(1.3, 8000, seed=m)
    for signed, data in ((True, x), (False, x.clamp_min(0))):
        rows = data.unsqueeze(0)
        solved = dmbq.fit_alphas(rows, m, signed, starts=tuple(np.linspace(0.2, 1.0, 9)))
        table = table_alphas(rows.float(), m, signed).double()
        err_t = float(dmbq.weighted_mse(rows, None, table, signed)[0])
        err_s = float(dmbq.weighted_mse(rows, None, solved, signed)[0])
        assert err_t <= 1.03 * err_s, (m, signed, err_t, err_s)


def test_table_gaussian_node_is_lloyd_max():
    """Untruncated Gaussian, 2 sign bases: the 4-level Lloyd-Max quantizer (+-0.4528, +-1.510; MSE 0.1175)."""
    t = shipped_table()
    alpha = t.lookup(torch.tensor([dmbq.gg_ratio(2.0)]), torch.tensor([24.0]), 2, True)[0]
    assert sorted((alpha[0] - alpha[1], alpha[0] + alpha[1])) == pytest.approx([0.4528, 1.510], abs=2e-3)


def test_shipped_table_is_what_the_command_writes():
    """One node rebuilt by ``build_table`` equals the shipped file's entries (the file is not stale)."""
    beta, clip = 2.0, 4.0
    node = build_table((beta,), (clip,), log=lambda *_: None, bases=(1, 2, 3))
    shipped = shipped_table()
    i, j = BETAS.index(beta), CLIPS.index(clip)
    for key, rows in node["alpha"].items():
        assert shipped.alpha[key][i, j].tolist() == pytest.approx(rows[0][0], abs=1e-5), key
    assert float(shipped.r[i, j]) == pytest.approx(node["r"][0][0], abs=1e-6)


def test_weight_quantizer_levels_and_ste():
    """Outputs are levels of their channel; gradient 1 between the extreme levels, 0 beyond; 0 bits prunes."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 2, 3, 3, generator=gen)
    w[0, 0, 0, 0] = 10.0  # far beyond any level
    quant = DmbqWeight(WeightQuantizer(2, 3), 2)
    quant.channel_bits[2] = 0
    w.requires_grad_(True)
    out = quant(w)
    rows = out.detach().reshape(3, -1)
    for c in range(2):
        lv = dmbq.levels(quant.alpha[c:c + 1, :2], True)[0]
        assert all((lv - v).abs().min() < 1e-6 for v in rows[c])
    assert torch.equal(rows[2], torch.zeros_like(rows[2]))  # pruned channel
    out.sum().backward()
    g = w.grad.reshape(3, -1)
    top = dmbq.levels(quant.alpha[:1, :2], True).max()
    assert g[0, 0] == 0 and float(w.detach()[0, 0, 0, 0]) > float(top)
    inside = w.detach().reshape(3, -1)[1].abs() <= dmbq.levels(quant.alpha[1:2, :2], True).max()
    assert torch.equal(g[1][inside], torch.ones(int(inside.sum())))
    assert torch.equal(g[1][~inside], torch.zeros(int((~inside).sum())))


def test_act_quantizer_unsigned_keeps_zero_and_moving_average():
    aq = ActQuantizer(2)
    act = DmbqAct(aq, 2, signed=False, momentum=0.5)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 5, generator=gen).relu()
    act.start(x)
    first = act.alpha.clone()
    act.train()
    y = act(x * 2)  # the average moves halfway toward the doubled batch's alphas
    assert torch.allclose(act.alpha, 0.5 * first + 0.5 * table_alphas((x * 2).reshape(1, -1), 2, False), rtol=1e-5)
    assert torch.equal(y[x == 0], torch.zeros(int((x == 0).sum())))  # zeros stay exactly zero
    lv = dmbq.levels(act.alpha, False)[0]
    assert ((y.reshape(-1, 1) - lv).abs().min(1).values < 1e-5).all()
    act.eval()
    frozen = act.alpha.clone()
    act(x * 5)
    assert torch.equal(act.alpha, frozen)  # evaluation does not move the alphas


def test_solvers_reach_no_worse_than_the_table():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 300, generator=gen) * torch.rand(8, 1, generator=gen)
    errs = {}
    for solver in ("table", "solve"):
        quant = DmbqWeight(WeightQuantizer(3, 8), 3, solver)
        q = quant(x)
        errs[solver] = float((q - x).pow(2).mean())
    assert errs["solve"] <= errs["table"] + 1e-7


def test_auto_solver_is_the_table_up_to_two_bases_and_lqnet_above():
    from lowbit.quant.dmbq_quantizers import AUTO_TABLE_MAX_BASES, solve_alphas

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 200, generator=gen) * torch.rand(6, 1, generator=gen)
    prev = dmbq.canonical(table_alphas(x, 3, True) * 1.3, True)  # an lqnet start that is not the table
    for m in range(1, dmbq.MAX_BASES + 1):
        p = prev[:, :m] if m <= 3 else None
        auto = solve_alphas(x, m, True, "auto", p)
        expected = solve_alphas(x, m, True, "table" if m <= AUTO_TABLE_MAX_BASES else "lqnet", p)
        assert torch.equal(auto, expected), m
    assert not torch.equal(solve_alphas(x, 3, True, "auto", prev), solve_alphas(x, 3, True, "table"))


def test_alternating_step_survives_a_float32_row_with_one_level_in_use():
    # every sample on one level: the normal equations are singular; a 1e-10 ridge vanishes in float32
    x = torch.full((2, 50), 0.25)
    alpha = dmbq.uniform_alphas(torch.ones(2), 3, True)
    new = dmbq.alternate_step(x, None, alpha, True)
    assert new.dtype == torch.float32 and torch.isfinite(new).all()
    q, _ = dmbq.assign(x, new, True)
    assert torch.allclose(q, x, atol=1e-4)  # the fitted levels still reproduce the constant row
