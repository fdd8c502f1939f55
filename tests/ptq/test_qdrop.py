"""QDrop as the official code does it: FP/quantized input mixing, AdaRound's sigmoid and schedule, the init grid."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.ptq.blocks import find_blocks
from lowbit.ptq.reconstruct import QDropOptions, ReconOptions, beta_at, block_input_layers, mix_inputs
from lowbit.quant.learnable import GAMMA, ZETA, LearnedStepAct, SoftRoundWeight
from lowbit.quant.layers import quant_layers
from lowbit.quant.quantizer import ActQuantizer, WeightQuantizer
from lowbit.quant.ranges import lp_grid_search_range, lp_search_range, minmax_range

from ..conftest import calib_tensor, make_model


def test_mix_inputs_takes_fp_elements_with_the_given_probability() -> None:
    gen = torch.Generator().manual_seed(0)
    quant, fp = torch.zeros(64, 8, 16, 16), torch.ones(64, 8, 16, 16)
    mixed, keep_fp = mix_inputs(quant, fp, 0.5, gen)
    assert torch.equal(mixed, keep_fp.float())  # FP exactly where the mask says, quantized elsewhere
    assert abs(keep_fp.float().mean().item() - 0.5) < 0.01  # 131072 draws: 0.5 +- 0.0014 (1 sd)
    # element-wise, not per sample or per channel: every image and every channel is mixed
    per_image = keep_fp.float().mean((1, 2, 3))
    assert per_image.min() > 0.4 and per_image.max() < 0.6
    _, rare = mix_inputs(quant, fp, 0.1, gen)
    assert abs(rare.float().mean().item() - 0.1) < 0.01


def test_block_input_quantizer_keeps_the_fp_elements_of_the_mixed_input() -> None:
    aq = ActQuantizer(2)
    aq.set_range(0.0, 1.0)
    act = LearnedStepAct(aq, drop_prob=0.5)
    gen = torch.Generator().manual_seed(1)
    quant_in, fp_in = torch.rand(4096, generator=gen), torch.rand(4096, generator=gen)
    mixed, keep_fp = mix_inputs(quant_in, fp_in, 0.5, gen)
    act.train()
    act.shared_keep = keep_fp
    # QDrop's block input: the FP network's value, or the quantized network's value quantized
    assert torch.equal(act(mixed), torch.where(keep_fp, fp_in, aq(quant_in)))
    act.eval()  # off at evaluation, whatever mask is set
    assert torch.equal(act(mixed), aq(mixed))
    act.train()
    act.shared_keep = keep_fp[:10]  # a mask of another shape is never applied: a fresh one is drawn
    out = act(mixed)
    assert out.shape == mixed.shape


def test_block_input_layers_are_the_layers_fed_the_block_input() -> None:
    fp = make_model("resnet20")
    q = lowbit.quantize(fp, calib_tensor(8), 4, 4, method="minmax", progress=False)
    blocks = {b.name: b for b in find_blocks(q, calib_tensor(2))}
    down = blocks["layers.1.0"]  # a stride-2 residual block with a projection shortcut
    names = {id(m): n for n, m in down.layers}
    x = torch.randn(2, down.layers[0][1].in_channels, 16, 16)
    found = sorted(names[id(m)] for m in block_input_layers(down, x))
    assert len(found) == 2 and found[0].endswith("conv1") and "conv2" not in " ".join(found)
    plain = blocks["layers.0.1"]
    x = torch.randn(2, plain.layers[0][1].in_channels, 16, 16)
    assert block_input_layers(plain, x) == [plain.layers[0][1]]


def test_qdrop_leaves_no_dropping_quantizer_behind() -> None:
    fp = make_model("zoofree")
    calib, held = calib_tensor(8, seed=1), calib_tensor(4, seed=2)
    q = lowbit.quantize(fp, calib, 2, 4, method="qdrop", iters=4, batch_size=4, w_symmetric=False, progress=False)
    for _, layer in quant_layers(q):
        assert type(layer.input_quant) is ActQuantizer and type(layer.weight_quant) is WeightQuantizer
    q.train()  # even in training mode nothing random is left: two passes agree
    with torch.no_grad():
        assert torch.equal(q(held), q(held))


def test_rectified_sigmoid_range_and_start() -> None:
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    wq = WeightQuantizer(2, 4, symmetric=False)
    wq.calibrate(w, minmax_range)
    r = SoftRoundWeight(wq, w)
    s, _ = wq.channel_params(4)
    frac = w / s - torch.floor(w / s)
    assert torch.allclose(r.h(), frac.clamp(1e-4, 1 - 1e-4), atol=1e-5)  # starts at the fractional part
    with torch.no_grad():
        r.v.copy_(torch.linspace(-20, 20, r.v.numel()).view_as(r.v))
    h = r.h()
    assert h.min().item() == 0.0 and h.max().item() == 1.0  # stretched past [0, 1], then clipped
    assert (ZETA, GAMMA) == (1.1, -0.1)  # AdaRound's zeta and gamma
    with torch.no_grad():
        r.v.zero_()
    assert torch.allclose(r.h(), torch.full_like(r.h(), 0.5))


def test_beta_annealing_values_match_the_published_schedule() -> None:
    opts = ReconOptions(iters=1000, warmup=0.2)  # beta 20 -> 2 after 20% warm-up, linear
    assert (opts.beta_start, opts.beta_end, opts.warmup, opts.reg_weight) == (20.0, 2.0, 0.2, 0.01)
    assert beta_at(199, opts) is None  # no rounding loss during warm-up
    assert beta_at(200, opts) == pytest.approx(20.0)
    assert beta_at(600, opts) == pytest.approx(11.0)
    assert beta_at(1000, opts) == pytest.approx(2.0)
    assert QDropOptions().drop_prob == 0.5 and ReconOptions().drop_prob == 0.0
    assert QDropOptions().act_lr == 4e-5 and QDropOptions().lr == 1e-3 and QDropOptions().batch_size == 32


def test_zero_point_search_finds_an_asymmetric_grid() -> None:
    # rows drawn from four levels that no min/max shrink can hit: -1, 0, 1, 2 (times 0.3)
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randint(-1, 3, (3, 500), generator=gen).float() * 0.3)
    rows[:, 0] = torch.tensor([-1.0, -1.0, -1.0])  # one outlier per row, which the search must clip
    lo, hi = lp_grid_search_range(rows, bits=2, signed=False, symmetric=False, p=2.4)
    wq = WeightQuantizer(2, 3, symmetric=False)
    wq.set_range(lo, hi)
    assert torch.allclose(wq.scale, torch.full((3,), 0.3), atol=0.01)
    assert torch.equal(wq.zero_point, torch.ones(3))
    err = lambda q: (q(rows.clone()) - rows).abs().pow(2.4).mean().item()  # noqa: E731
    shrink = WeightQuantizer(2, 3, symmetric=False)
    shrink.calibrate(rows, lp_search_range, p=2.4)
    assert err(wq) < err(shrink)
    # symmetric codes have no zero point: the same answer as the shrink search
    sym = lp_grid_search_range(rows, bits=2, signed=True, symmetric=True, narrow=True, p=2.4)
    ref = lp_search_range(rows, bits=2, signed=True, symmetric=True, narrow=True, p=2.4)
    assert all(torch.equal(a, b) for a, b in zip(sym, ref))


def test_brecq_and_qdrop_default_to_the_published_asymmetric_grid() -> None:
    from lowbit.config import QuantConfig, build_config
    from lowbit.ptq.registry import get_method

    def w_symmetric(method: str, **options) -> bool:
        spec = get_method(method)
        cfg, _ = build_config(2, 4, options, spec.option_names, spec.config_defaults)
        return cfg.w_symmetric

    for method in ("brecq", "qdrop"):
        assert w_symmetric(method) is False  # four levels at 2 bits, as both official codes
        assert w_symmetric(method, w_symmetric=True) is True  # an explicit option wins
        assert w_symmetric(method, config=QuantConfig()) is True  # so does a config= object
    assert w_symmetric("mse") is True and w_symmetric("distill") is True  # other methods keep theirs
    with pytest.raises(TypeError):
        from lowbit.ptq.registry import register_method
        register_method("never-registered", config_defaults={"w_symetric": False})
