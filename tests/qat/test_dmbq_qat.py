"""DMBQ QAT and LBA: the method end to end, exact BN folding, the budget invariant, resume, summary."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import lowbit
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.graph.fold import find_conv_bn_pairs
from lowbit.graph.surgery import prepare
from lowbit.qat.dmbq import DmbqOptions, dmbq_finalize, dmbq_setup
from lowbit.qat.lba import LbaState
from lowbit.quant import dmbq
from lowbit.quant.dmbq_quantizers import DmbqAct, DmbqWeight
from lowbit.quant.dmbq_table import table_alphas
from lowbit.quant.layers import quant_layers

from ..conftest import randomize_bn, self_labelled


def _data(n: int = 48, seed: int = 0):
    return self_labelled("resnet20", n, seed)


def _qat(fp, x, y, **kw):
    base = dict(method="dmbq", w_bits=2, a_bits=2, epochs=1, batch_size=16, lr=0.01, progress=False,
                log=lambda s: None)
    base.update(kw)
    return lowbit.qat(fp, (x, y), **base)


def _setup(fp, x, opts: DmbqOptions, w_bits: int = 2):
    cfg = QuantConfig(w_bits=w_bits, a_bits=2, fold_bn=False, progress=False)
    qmodel, _ = prepare(fp, cfg, x[:2])
    lowbit.record_of(qmodel).bn_pairs = find_conv_bn_pairs(fp, scale_mergeable=True)
    dmbq_setup(qmodel, x, cfg, opts)
    return qmodel, cfg


def test_dmbq_method_end_to_end_levels():
    """Body layers end as frozen multi-bit quantizers whose weights are levels of their channel."""
    fp, x, y = _data()
    q = _qat(fp, x, y)
    body = [(n, m) for n, m in quant_layers(q) if isinstance(m.weight_quant, DmbqWeight)]
    assert body and all(m.weight_quant.frozen for _, m in body)
    for _, m in body:
        wq = m.weight_quant
        assert torch.equal(wq.channel_bits, torch.full_like(wq.channel_bits, 2))
        rows = wq.rows(m.weight.detach())
        lv = dmbq.levels(wq.alpha[:, :2], True)  # (C, 4)
        assert ((rows.unsqueeze(-1) - lv.unsqueeze(1)).abs().min(-1).values < 1e-5).all()
        assert torch.equal(wq(m.weight), m.weight)  # committed weights reproduce themselves
    acts = [m.input_quant for _, m in quant_layers(q) if isinstance(m.input_quant, DmbqAct)]
    assert acts and any(not a.signed for a in acts)  # post-ReLU inputs take {0, 1} bases
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in q.modules())  # BN folded
    s = lowbit.summary(q)
    assert {r.w_bits for r in s.layers if r.role == "body"} == {2}


def test_bn_folds_exactly_into_the_alphas():
    fp, x, _ = _data()
    randomize_bn(fp, seed=3)
    qmodel, cfg = _setup(fp, x, DmbqOptions())
    qmodel.eval()
    for _, layer in quant_layers(qmodel):  # commit first: folding must not change the function
        if hasattr(layer.weight_quant, "commit"):
            layer.weight_quant = layer.weight_quant.commit(layer)
    with torch.no_grad():
        before = qmodel(x[:8])
    dmbq_finalize(qmodel, cfg, DmbqOptions())
    with torch.no_grad():
        after = qmodel(x[:8])
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)


def _managed(qmodel):
    return [(m, m.weight_quant) for _, m in quant_layers(qmodel) if isinstance(m.weight_quant, DmbqWeight)]


@pytest.mark.parametrize("mode,budget,fraction", [("channel", 0.7, 0.0), ("channel", 1.5, 0.0), ("layer", 1.5, 0.0),
                                                  ("channel", 2.0, 0.0), ("channel", 0.7, 0.05),
                                                  ("layer", 1.2, 0.2)])
def test_lba_budget_invariant_over_many_steps(mode, budget, fraction):
    """Random sensitivities, 300 reallocations: the true average never exceeds the budget, bits move."""
    fp, x, _ = _data(16)
    qmodel, _ = _setup(fp, x, DmbqOptions())
    state = LbaState(_managed(qmodel), mode, budget, every=1, max_bits=4, fraction=fraction)
    state.initial_allocation()
    cap = Fraction(budget).limit_denominator(10 ** 6) * state.params()
    assert state.total_bits() <= cap
    gen = torch.Generator().manual_seed(0)
    start = [q.channel_bits.clone() for _, q in state._layers]
    for _ in range(300):
        for _, q in state._layers:
            q.score.copy_(torch.rand(q.score.shape, generator=gen, dtype=torch.float64))
            q.layer_score.fill_(float(torch.rand(1, generator=gen)))
        state.reallocate()
        assert state.total_bits() <= cap, state.average_bits()
        for _, q in state._layers:
            assert int(q.channel_bits.min()) >= 0 and int(q.channel_bits.max()) <= 4
            if mode == "layer":
                assert bool((q.channel_bits == q.channel_bits[0]).all()) and q.pruned_channels == 0
    assert int(state.moves) > 0
    assert any(not torch.equal(a, q.channel_bits) for a, (_, q) in zip(start, state._layers))
    if budget < 1:
        assert any(q.pruned_channels for _, q in state._layers)  # 0.7 bits: some channels pruned


def test_lba_moves_a_bit_toward_the_sensitive_unit():
    fp, x, _ = _data(16)
    qmodel, _ = _setup(fp, x, DmbqOptions())
    state = LbaState(_managed(qmodel), "channel", 2.0, every=1, max_bits=4)
    state.initial_allocation()
    (_, first), (_, last) = state._layers[0], state._layers[-1]
    for _, q in state._layers:
        q.score.fill_(1.0)
    first.score[0] = 10.0
    last.score[:] = 0.01  # the least sensitive: pays for it
    state.reallocate()
    assert int(first.channel_bits[0]) == 3
    assert int(last.channel_bits.min()) == 1 and int(state.total_bits()) <= 2 * state.params()


def test_lba_fraction_moves_several_units_per_reallocation():
    """fraction=0.05 of ResNet-20's channels: the 5% most sensitive gain a bit, the least sensitive pay."""
    fp, x, _ = _data(16)
    qmodel, _ = _setup(fp, x, DmbqOptions())
    state = LbaState(_managed(qmodel), "channel", 2.0, every=1, max_bits=4, fraction=0.05)
    state.initial_allocation()
    units = len(state._units())
    k = round(0.05 * units)
    assert state.moves_per_step() == k > 1
    gen = torch.Generator().manual_seed(1)
    for _, q in state._layers:
        q.score.copy_(torch.rand(q.score.shape, generator=gen, dtype=torch.float64) + 1)
    flat = torch.cat([q.score for _, q in state._layers])
    top = set(flat.argsort(descending=True)[:k].tolist())
    state.reallocate()
    bits = torch.cat([q.channel_bits for _, q in state._layers])
    assert set((bits == 3).nonzero().squeeze(1).tolist()) == top and int(state.moves) == k
    lost = bits < 2  # donors (channel sizes differ, so not exactly k of them): the least sensitive
    assert bool(lost[flat.argmin()]) and float(flat[lost].max()) < float(flat[bits == 3].min())
    assert state.total_bits() <= 2 * state.params()
    with pytest.raises(LowbitError, match="at least 1"):  # LP never prunes a whole layer
        LbaState(_managed(qmodel), "layer", 0.7, every=1, max_bits=4)
    with pytest.raises(LowbitError, match="fraction"):
        LbaState(_managed(qmodel), "channel", 2.0, every=1, max_bits=4, fraction=1.5)


def test_lba_move_score_ranks_givers_by_the_cost_of_their_move():
    """score="move": shifted widths are the table quantization one base up/down (1 -> 0: zeros), and a
    QAT run tracks them, keeps the budget and moves bits."""
    fp, x, y = _data()
    qmodel, _ = _setup(fp, x, DmbqOptions())
    _, wq = _managed(qmodel)[1]
    rows = wq.rows(_managed(qmodel)[1][0].weight.detach())
    wq.channel_bits[:2] = 1
    down, up = wq.shifted_rows(rows, -1), wq.shifted_rows(rows, 1)
    assert bool((down[:2] == 0).all())
    up3 = dmbq.assign(rows[2:], table_alphas(rows[2:], 3, True), True)[0]
    assert torch.equal(up[2:], up3)
    q = _qat(fp, x, y, w_bits=1.5, lba="channel", lba_every=1, lba_fraction=0.05, lba_score="move")
    managed = [(m, m.weight_quant) for _, m in quant_layers(q) if isinstance(m.weight_quant, DmbqWeight)]
    bits = sum(int(wq.channel_bits.sum()) * (m.weight.numel() // wq.channels) for m, wq in managed)
    assert bits / sum(m.weight.numel() for m, _ in managed) <= 1.5 and lowbit.record_of(q).lba_moves > 0


def test_lba_through_qat_fractional_budget_and_summary():
    fp, x, y = _data()
    q = _qat(fp, x, y, w_bits=1.5, lba="channel", lba_every=1)
    managed = [(m, m.weight_quant) for _, m in quant_layers(q) if isinstance(m.weight_quant, DmbqWeight)]
    n = sum(m.weight.numel() for m, _ in managed)
    bits = sum(int(wq.channel_bits.sum()) * (m.weight.numel() // wq.channels) for m, wq in managed)
    assert bits / n <= 1.5
    assert lowbit.record_of(q).lba_moves > 0 and q.lowbit_info["options"]["w_budget"] == 1.5
    s = lowbit.summary(q)
    rows = {r.name: r for r in s.layers}
    for name, m in quant_layers(q):
        if isinstance(m.weight_quant, DmbqWeight):
            assert rows[name].w_bits == pytest.approx(m.weight_quant.channel_bits.double().mean().item())
            per = m.weight.numel() // m.weight_quant.channels
            total = int(m.weight_quant.channel_bits.sum())
            assert rows[name].weight_bytes == (per * total + 7) // 8 + 4 * total
    assert s.totals["pruned_channels"] == sum(wq.pruned_channels for _, wq in managed)
    assert not hasattr(q, "lowbit_lba") and not q._forward_pre_hooks  # the allocator is gone


def test_resume_with_lba_gives_the_same_model(tmp_path):
    fp, x, y = _data()
    kw = dict(w_bits=1.5, lba="channel", lba_every=2, lba_fraction=0.05, epochs=2)
    full = _qat(fp, x, y, **kw)
    ckpt = tmp_path / "run.ckpt"
    part = _qat(fp, x, y, checkpoint=str(ckpt), max_steps=3, checkpoint_every=1, **kw)
    assert not lowbit.record_of(part).qat["finished"]
    done = _qat(fp, x, y, checkpoint=str(ckpt), resume=True, **kw)
    assert lowbit.record_of(full).lba_moves == lowbit.record_of(done).lba_moves > 0
    for (n, a), b in zip(full.state_dict().items(), done.state_dict().values()):
        assert torch.equal(a, b), n


def test_option_errors():
    fp, x, y = _data(16)
    with pytest.raises(LowbitError, match="need lba"):
        _qat(fp, x, y, w_bits=1.5)
    with pytest.raises(LowbitError, match="whole"):
        _qat(fp, x, y, w_bits=1.5, lba="global")
    with pytest.raises(LowbitError):
        _qat(fp, x, y, solver="exact")
    with pytest.raises(LowbitError):
        _qat(fp, x, y, method="lsq", w_bits=1.5)  # only allocating methods take a budget


def test_bit_map_report(tmp_path):
    from lowbit.qat.lba import bit_map, bit_map_markdown, bit_map_png

    fp, x, _ = _data(16)
    qmodel, _ = _setup(fp, x, DmbqOptions())
    managed = _managed(qmodel)
    managed[0][1].channel_bits[0] = 0
    managed[0][1].channel_bits[1] = 3
    rows = bit_map(qmodel)
    assert [r["layer"] for r in rows] == [n for n, m in quant_layers(qmodel) if isinstance(m.weight_quant, DmbqWeight)]
    assert rows[0]["hist"][0] == 1 and rows[0]["hist"][3] == 1 and rows[0]["pruned"] == 1
    assert "| 1 |" in bit_map_markdown(rows)
    bit_map_png(rows, str(tmp_path / "bits.png"))
    assert (tmp_path / "bits.png").stat().st_size > 1000


@pytest.mark.cuda
def test_dmbq_lba_on_cuda_exports_and_reloads_on_cpu(tmp_path):
    """Every DMBQ / LBA tensor follows the model to the GPU; the artifact reloads on the CPU."""
    fp, x, y = _data(16)
    q = _qat(fp, x, y, w_bits=1.5, lba="channel", lba_every=1, batch_size=8, device="cuda")
    assert all(t.device.type == "cuda" for t in list(q.parameters()) + list(q.buffers()))
    with torch.no_grad():
        out = q(x.cuda()).cpu()
    cpu = lowbit.load(lowbit.export(q, tmp_path / "q.lowbit"), fp, device="cpu")
    with torch.no_grad():
        back = cpu(x)
    assert (back - out).abs().max() <= 0.02 * out.abs().max() and (back.argmax(1) == out.argmax(1)).float().mean() >= 7 / 8
