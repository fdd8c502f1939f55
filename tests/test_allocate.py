"""lowbit.allocate_bits: never over budget; DP equals brute force up to its stated gap; greedy compared."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import lowbit
from lowbit.allocate import average_bits, solve_dp, solve_greedy, weight_cost
from lowbit.deploy.size import MB
from lowbit.sensitivity import SensitivityReport


def brute_force(costs, values, budget):
    """Least total value over every selection within the budget (None when none fits)."""
    best = None
    for choice in itertools.product(*(range(len(r)) for r in costs)):
        if sum(costs[i][j] for i, j in enumerate(choice)) <= budget:
            v = sum(values[i][j] for i, j in enumerate(choice))
            best = v if best is None or v < best else best
    return best


def random_instance(rng: random.Random, layers: int, choices: int):
    costs, values = [], []
    for _ in range(layers):
        base = rng.randint(1, 40)
        widths = sorted(rng.sample(range(1, 9), choices))
        costs.append([base * w for w in widths])
        # decreasing in width, with noise (real sensitivities are not convex)
        values.append(sorted((rng.random() * 10 for _ in widths), reverse=True))
    return costs, values


def total(costs_or_values, choice):
    return sum(row[j] for row, j in zip(costs_or_values, choice))


@pytest.mark.parametrize("seed", range(60))
def test_dp_exact_against_brute_force(seed):
    rng = random.Random(seed)
    costs, values = random_instance(rng, rng.randint(1, 5), rng.randint(1, 4))
    lo, hi = sum(min(r) for r in costs), sum(max(r) for r in costs)
    budget = rng.randint(max(lo - 5, 0), hi + 5)
    best = brute_force(costs, values, budget)
    dp = solve_dp(costs, values, budget)  # budget < resolution: unit 1, exact
    greedy = solve_greedy(costs, values, budget)
    if best is None:
        assert dp is None and greedy is None
        return
    assert total(costs, dp) <= budget and total(costs, greedy) <= budget
    assert total(values, dp) == pytest.approx(best)
    assert total(values, greedy) >= best - 1e-9


@pytest.mark.parametrize("seed", range(40))
def test_dp_discretised_within_stated_gap(seed):
    """With ``u > 1``: within budget, and no worse than the exact optimum of budget - L * u."""
    rng = random.Random(1000 + seed)
    costs, values = random_instance(rng, rng.randint(2, 5), rng.randint(2, 4))
    lo, hi = sum(min(r) for r in costs), sum(max(r) for r in costs)
    budget = rng.randint(lo, hi)
    resolution = rng.randint(3, 30)
    unit = max(1, math.ceil((budget - lo) / resolution))  # the slack above the cheapest selection
    dp = solve_dp(costs, values, budget, resolution)
    tightened = brute_force(costs, values, budget - len(costs) * unit)
    assert dp is not None  # the cheapest selection fits (budget >= lo), so the DP always finds one
    assert total(costs, dp) <= budget
    assert total(values, dp) >= brute_force(costs, values, budget) - 1e-9
    if tightened is not None:
        assert total(values, dp) <= tightened + 1e-9


def test_greedy_can_be_worse_than_dp():
    """A known case where marginal-gain ascent is suboptimal: the DP finds the better pair."""
    costs = [[1, 10], [1, 6], [1, 6]]
    values = [[10.0, 0.0], [6.0, 0.5], [6.0, 0.5]]  # ratio favours items 1 and 2 first
    budget = 13
    dp, greedy = solve_dp(costs, values, budget), solve_greedy(costs, values, budget)
    assert total(values, dp) == pytest.approx(brute_force(costs, values, budget))
    assert total(values, greedy) > total(values, dp)


def fake_report(rng: random.Random, layers: int, bits=(1, 2, 3, 4, 8)) -> SensitivityReport:
    names = [f"l{i}" for i in range(layers)]
    params = {n: rng.choice([9, 27, 144, 576, 2304, 4608, 10]) * rng.randint(1, 4) for n in names}
    scores = {n: dict(zip(bits, sorted((rng.random() ** 3 * 5 for _ in bits), reverse=True))) for n in names}
    return SensitivityReport(metric="kl", target="weights", bits=tuple(bits), scores=scores, params=params,
                             out_channels={n: rng.randint(1, 8) for n in names},
                             input_elements={n: rng.randint(10, 1000) for n in names}, order=names)


@pytest.mark.parametrize("solver", ["dp", "greedy"])
def test_true_average_never_exceeds_budget(solver):
    rng = random.Random(7)
    for _ in range(150):
        report = fake_report(rng, rng.randint(2, 25))
        avg = rng.choice([1.0, 1.5, 2.0, 2.5, 3.0, 3.3, 4.0, 2 + rng.random() * 3])
        fl = rng.choice([8, None])
        try:
            got = lowbit.allocate_bits(report=report, avg_w_bits=avg, solver=solver, first_last_bits=fl,
                                       resolution=rng.choice([50, 1000, 50_000]))
        except lowbit.LowbitError as exc:
            assert "too small" in str(exc)
            continue
        assert list(got) == report.order
        assert average_bits(got, report.params) <= avg
        assert all(isinstance(b, int) and b in report.bits + ((8,) if fl else ()) for b in got.values())
        if fl:
            assert got["l0"] == got[report.order[-1]] == 8


def test_size_budget_never_exceeded():
    rng = random.Random(3)
    for _ in range(100):
        report = fake_report(rng, rng.randint(2, 12))
        full = sum(weight_cost(report, n, 8, True) for n in report.order)
        size_mb = full * (0.2 + 0.8 * rng.random()) / MB
        try:
            got = lowbit.allocate_bits(report=report, size_mb=size_mb)  # replaces the default avg_w_bits
        except lowbit.LowbitError as exc:
            assert "too small" in str(exc)
            continue
        assert sum(weight_cost(report, n, b, True) for n, b in got.items()) <= size_mb * MB


def test_dp_on_reports_matches_brute_force():
    rng = random.Random(11)
    for _ in range(20):
        report = fake_report(rng, 4, bits=(2, 3, 4))
        got = lowbit.allocate_bits(report=report, avg_w_bits=3.0, first_last_bits=None)
        P = sum(report.params.values())
        names = report.order
        costs = [[report.params[n] * b for b in report.bits] for n in names]
        values = [[report.scores[n][b] for b in report.bits] for n in names]
        best = brute_force(costs, values, math.floor(3 * P))
        assert sum(report.scores[n][b] for n, b in got.items()) == pytest.approx(best)


def test_zero_bits_excluded_at_layer_granularity():
    report = fake_report(random.Random(0), 5, bits=(1, 2, 4))
    got = lowbit.allocate_bits(report=report, avg_w_bits=1.0, candidates=(0, 1, 2, 4), first_last_bits=None)
    assert set(got.values()) == {1}  # 0 would fit a lower budget, but it prunes whole layers
    with pytest.raises(lowbit.LowbitError, match="too small"):
        lowbit.allocate_bits(report=report, avg_w_bits=0.5, candidates=(0, 1, 2), first_last_bits=None)
    with pytest.raises(lowbit.LowbitError, match="channel"):
        lowbit.allocate_bits(report=report, avg_w_bits=2.0, granularity="channel")
    with pytest.raises(lowbit.LowbitError, match="0 bits"):
        lowbit.allocate_bits(report=report, avg_w_bits=2.0, candidates=(0,))


@pytest.mark.parametrize("kwargs, message", [
    (dict(avg_w_bits=-1.0), "positive"),
    (dict(avg_w_bits=3.0, size_mb=1.0), "exactly one"),  # an explicit 3.0 is not the default
    (dict(avg_w_bits=None), "exactly one"),
    (dict(avg_w_bits=3.0, solver="ilp"), "solver"),
    (dict(avg_w_bits=3.0, candidates=(2, 17)), "0..16"),
    (dict(avg_w_bits=3.0, candidates=(5, 6)), "none of the candidates"),
    (dict(avg_w_bits=3.0, first_last_bits=0), "first_last_bits"),
])
def test_bad_arguments(kwargs, message):
    report = fake_report(random.Random(0), 4, bits=(2, 4))
    with pytest.raises(lowbit.LowbitError, match=message):
        lowbit.allocate_bits(report=report, **kwargs)


def test_end_to_end_weights_and_activations_with_taylor():
    from tests.test_sensitivity import Fragile

    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    got = lowbit.allocate_bits(Fragile(), x, avg_w_bits=3.0, avg_a_bits=4.0, candidates=(2, 4, 8),
                               metric="taylor", granularity="layer")
    assert list(got) == ["conv1", "conv2", "conv3", "fc"]
    assert got["conv1"] == 8  # the first layer's input is not quantized: weight bits only
    assert got["fc"] == (8, 8)
    assert all(isinstance(got[n], tuple) for n in ("conv2", "conv3"))
    w = {n: (v[0] if isinstance(v, tuple) else v) for n, v in got.items()}
    params = {"conv1": 72, "conv2": 576, "conv3": 576, "fc": 40}
    assert average_bits(w, params) <= 3.0


@pytest.mark.parametrize("seed", range(6))
def test_hull_greedy_feasible_and_within_its_gap(seed):
    from lowbit.allocate import solve_hull

    rng = random.Random(seed)
    costs, values = random_instance(rng, 4, 3)
    costs = [[0] + row for row in costs]  # a free "pruned" choice with a large value
    values = [[20 + rng.random()] + row for row in values]
    budget = rng.randint(sum(min(r) for r in costs), sum(max(r) for r in costs))
    choice, gap = solve_hull(costs, values, budget)
    assert total(costs, choice) <= budget
    assert total(values, choice) <= brute_force(costs, values, budget) + gap + 1e-9
    assert solve_hull([[5, 6]], [[1.0, 0.0]], 4) is None


def test_channel_allocation_never_exceeds_budget_and_quantizes():
    from tests.test_sensitivity import Fragile

    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    report = lowbit.sensitivity(Fragile(), x, bits=(1, 2, 3, 4, 8), metric="taylor", per_channel=True)
    assert report.granularity == "channel" and set(report.extra["channel_scores"]["conv2[0]"]) == {0, 1, 2, 3, 4, 8}
    again = SensitivityReport.from_dict(report.to_dict())
    assert again.extra["channel_scores"] == report.extra["channel_scores"]
    params = {"conv1": 72, "conv2": 576, "conv3": 576, "fc": 40}
    for budget in (1.5, 2.5, 3.0):
        got = lowbit.allocate_bits(report=report, avg_w_bits=budget, granularity="channel",
                                   candidates=(0, 1, 2, 3, 4, 8))
        assert got["conv1"] == 8 and got["fc"] == 8  # the protocol's fixed ends
        assert average_bits(got, params) <= budget
        lists = [v for v in got.values() if isinstance(v, list)]
        assert all(len(v) == 8 and max(v) > 0 for v in lists)  # every layer keeps a channel
        if budget == 1.5:  # the fixed ends leave under 1 bit per weight of conv2 and conv3: channels are pruned
            assert any(0 in v for v in lists)
            with pytest.raises(lowbit.LowbitError, match="too small"):  # per layer it does not fit at all
                lowbit.allocate_bits(report=report, avg_w_bits=budget, candidates=(1, 2, 3, 4, 8))
    q = lowbit.quantize(Fragile(), x, w_bits=4, a_bits=8, layer_bits=got)
    for n, v in got.items():
        if isinstance(v, list):
            assert lowbit.record_of(q).layer_bits[n].channel_bits == tuple(v)
    with pytest.raises(lowbit.LowbitError, match="metric='taylor'"):
        lowbit.allocate_bits(report=report, avg_w_bits=2.0, granularity="channel", metric="kl")
    with pytest.raises(lowbit.LowbitError, match="per_channel=True scores weight channels"):
        lowbit.sensitivity(Fragile(), x, bits=(2,), metric="kl", per_channel=True)
