"""Calibration must see what each layer saw, whatever the model does in place afterwards.

Every model below comes as an in-place version and an out-of-place twin with the same weights
and the same function; quantizing either must give exactly the same model. Before the fix the
observers kept views of layer inputs (rewritten by ``x += ...``, ``mul_``, ``relu_`` after the
layer), block caches read a block's input after the block had changed it, the hook walk kept
views, and models that change their own input rewrote the calibration set between passes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.ptq.blocks import capture_block_io
from lowbit.ptq.common import observe_fp_inputs
from lowbit.ptq.sequential import capture_inputs
from lowbit.quant.layers import quant_layers
from lowbit.quant.quantizer import ActObserver

from ..conftest import calib_tensor


class _StemConvHead(nn.Module):
    """stem conv, conv, linear head; ``inplace`` picks the in-place form of the subclass's forward,
    ``untraceable`` adds a data-dependent branch torch.fx cannot trace."""

    def __init__(self, inplace: bool = True, untraceable: bool = False) -> None:
        super().__init__()
        self.inplace, self.untraceable = inplace, untraceable
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)


class ResidualInPlace(_StemConvHead):
    """``x += 3 * conv(x)``: the conv's input is rewritten right after the conv read it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.untraceable and x.sum() < -1e30:  # data-dependent branch: torch.fx cannot trace this
            x = -x
        if self.inplace:
            x += 3 * self.conv(x)
        else:
            x = x + 3 * self.conv(x)
        return self.head(x.mean((2, 3)))


class ScaleAndRelu(nn.Module):
    """``relu_`` on a conv's input and ``mul_(50)`` on a linear layer's input, after those layers ran."""

    def __init__(self, inplace: bool, untraceable: bool = False) -> None:
        super().__init__()
        self.inplace, self.untraceable = inplace, untraceable
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)  # has negative values
        if self.untraceable and a.sum() < -1e30:
            a = -a
        b = self.conv(a)
        if self.inplace:
            a.relu_()
        else:
            a = a.relu()
        c = self.conv2(F.relu(b) + a)
        h = c.mean((2, 3))
        y = self.fc1(h)
        if self.inplace:
            h.mul_(50)
        else:
            h = h * 50
        return self.fc2(F.relu(y)) + h.sum(1, keepdim=True)


class DoublesItsInput(_StemConvHead):
    """Changes its own input in place (as ``x.sub_(mean)`` would) before the first layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            x.mul_(2)
        else:
            x = x * 2
        a = F.relu(self.stem(x))
        if self.untraceable and a.sum() < -1e30:
            a = -a
        return self.head(F.relu(self.conv(a)).mean((2, 3)))


class _ScalingBlock(nn.Module):
    """A block that doubles its input in place before its conv (not idempotent, unlike ReLU)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            x.mul_(2)
        else:
            x = x * 2
        return F.relu(self.conv(x))


class BlockChangesItsInput(nn.Module):
    """A reconstruction block whose first operation rewrites the block input in place."""

    def __init__(self, inplace: bool, untraceable: bool = False) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = _ScalingBlock(inplace)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        if self.untraceable and a.sum() < -1e30:
            a = -a
        return self.head(self.block(a).mean((2, 3)))


MODELS = {"residual": ResidualInPlace, "scale_relu": ScaleAndRelu, "input": DoublesItsInput,
          "block": BlockChangesItsInput}


def twins(kind: str, untraceable: bool = False) -> tuple[nn.Module, nn.Module]:
    """The in-place model and its out-of-place twin, with identical weights."""
    out = []
    for inplace in (True, False):
        torch.manual_seed(0)
        out.append(MODELS[kind](inplace, untraceable).eval())
    return out[0], out[1]


def _assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"in-place and out-of-place twins quantize differently: {diff}"


def _input_scales(q: nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (l.input_quant.scale.item(), l.input_quant.zero_point.item())
            for n, l in quant_layers(q) if l.input_quant.enabled}


def test_observer_keeps_copies_not_views() -> None:
    obs = ActObserver(sample_per_batch=1000)
    x = torch.linspace(-1, 1, 100)
    obs.update(x)
    x.mul_(50)  # the model rewrites the tensor after the layer read it
    assert obs.values().abs().max().item() == pytest.approx(1.0)
    assert all(s.data_ptr() != x.data_ptr() for s in obs.samples)


@pytest.mark.parametrize("kind", ["residual", "scale_relu", "input"])
@pytest.mark.parametrize("method", ["minmax", "mse", "aciq"])
def test_range_methods_give_identical_scales(kind: str, method: str) -> None:
    inplace, twin = twins(kind)
    calib = calib_tensor(16)
    opts = {"candidates": 20} if method == "mse" else {}
    qa = lowbit.quantize(inplace, calib, 4, 4, method=method, **opts)
    qb = lowbit.quantize(twin, calib, 4, 4, method=method, **opts)
    scales_a, scales_b = _input_scales(qa), _input_scales(qb)
    assert scales_a and scales_a == scales_b
    _assert_same_model(qa, qb)


@pytest.mark.parametrize("kind", ["residual", "scale_relu"])
def test_observed_values_are_what_the_layers_saw(kind: str) -> None:
    """The observers' extremes equal those of the inputs recorded by copying pre-hooks."""
    inplace, _ = twins(kind)
    calib = calib_tensor(16)
    q = lowbit.quantize(inplace, calib, 4, 4)
    cfg = lowbit.QuantConfig()
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0].clone()))
               for name, layer in quant_layers(q) if layer.input_quant.enabled]
    try:
        observers = observe_fp_inputs(q, calib, cfg)
    finally:
        for h in handles:
            h.remove()
    for name, obs in observers.items():
        true = torch.cat([t.reshape(-1) for t in seen[name]])
        values = obs.values()
        assert values.min().item() == true.min().item() and values.max().item() == true.max().item(), name


def test_model_changing_its_input_leaves_calibration_data_alone() -> None:
    inplace, twin = twins("input")
    calib = calib_tensor(16)
    before = calib.clone()
    qa = lowbit.quantize(inplace, calib, 4, 4, method="mse", candidates=10)
    assert torch.equal(calib, before)  # the caller's tensor is untouched
    qb = lowbit.quantize(twin, calib, 4, 4, method="mse", candidates=10)
    _assert_same_model(qa, qb)


LEARNED = {
    "brecq": {"iters": 4, "batch_size": 8},
    "qdrop": {"iters": 4, "batch_size": 8},
    "distill": {"block_iters": 2, "joint_iters": 2, "batch_size": 8},
    "bitsplit": {"iters": 1},
}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(LEARNED))
def test_learned_methods_identical_for_in_place_twins(kind: str, method: str) -> None:
    inplace, twin = twins(kind)
    calib = calib_tensor(16)
    qa = lowbit.quantize(inplace, calib, 4, 4, method=method, **LEARNED[method])
    qb = lowbit.quantize(twin, calib, 4, 4, method=method, **LEARNED[method])
    _assert_same_model(qa, qb)


@pytest.mark.parametrize("kind", ["residual", "scale_relu", "input"])
def test_untraceable_layer_walk_identical_for_in_place_twins(kind: str) -> None:
    """Bit-Split on untraceable models captures layer inputs with hooks (capture_inputs)."""
    inplace, twin = twins(kind, untraceable=True)
    calib = calib_tensor(16)
    qa = lowbit.quantize(inplace, calib, 4, 4, method="bitsplit", iters=1)
    qb = lowbit.quantize(twin, calib, 4, 4, method="bitsplit", iters=1)
    _assert_same_model(qa, qb)


def test_capture_inputs_copies_layer_inputs() -> None:
    inplace, twin = twins("scale_relu")
    calib = calib_tensor(8)
    cfg = lowbit.QuantConfig()
    got = [capture_inputs(m, {n: getattr(m, n) for n in ("conv", "fc1")}, calib, cfg) for m in (inplace, twin)]
    for name in ("conv", "fc1"):
        assert torch.equal(got[0][name], got[1][name]), name
    assert got[0]["conv"].min() < 0  # the conv saw negative inputs (relu_ came after it)


def test_block_cache_holds_the_input_before_the_block_ran() -> None:
    inplace, twin = twins("block")
    calib = calib_tensor(8)
    caches = [capture_block_io(m, m.block, calib, 4, 2 ** 30, torch.device("cpu")) for m in (inplace, twin)]
    idx = torch.arange(len(calib))
    (ins_a, outs_a), (ins_b, outs_b) = caches
    assert torch.equal(ins_a.get(idx), ins_b.get(idx))
    assert torch.equal(outs_a.get(idx), outs_b.get(idx))
    # replaying the cached input through the in-place block reproduces the cached output
    with torch.no_grad():
        assert torch.equal(inplace.block(ins_a.get(idx)), outs_a.get(idx))
