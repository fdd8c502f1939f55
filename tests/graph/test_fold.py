"""BatchNorm folding and cross-layer equalization preserve the FP function."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.graph import equalize, find_conv_bn_pairs, find_equalization_pairs, fold_batchnorm, fold_conv_bn
from tests.conftest import calib_tensor, make_model, make_zoo, randomize_bn, rel_err


def _no_batchnorm(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fold_exact_float32(any_model):
    x = calib_tensor(8)
    folded = copy.deepcopy(any_model)
    pairs = fold_batchnorm(folded)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in any_model.modules())
    assert _no_batchnorm(folded)
    with torch.no_grad():
        ref, out = any_model(x), folded(x)
    assert ref.abs().max() > 1e-3  # the comparison is not vacuous
    assert rel_err(out, ref) < 1e-5


def test_fold_exact_float64(any_model):
    model = any_model.double()
    x = calib_tensor(4).double()
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    for conv_name, _ in find_conv_bn_pairs(model):
        conv = folded.get_submodule(conv_name)
        assert conv.weight.dtype == torch.float64 and conv.bias.dtype == torch.float64
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-10


def test_fold_changes_weights_and_adds_bias(resnet20):
    folded = copy.deepcopy(resnet20)
    fold_batchnorm(folded)
    assert resnet20.conv1.bias is None
    assert folded.conv1.bias is not None
    bn = resnet20.bn1
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(folded.conv1.weight, resnet20.conv1.weight * factor.view(-1, 1, 1, 1), atol=1e-6)
    assert torch.allclose(folded.conv1.bias, bn.bias - bn.running_mean * factor, atol=1e-6)
    assert isinstance(folded.bn1, nn.Identity)


def test_fold_conv_bn_with_conv_bias_and_plain_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, bias=True)
    for affine in (True, False):
        bn = randomize_bn(nn.BatchNorm2d(5, affine=affine), seed=3).eval()
        ref = nn.Sequential(copy.deepcopy(conv), bn).eval()
        c = copy.deepcopy(conv)
        fold_conv_bn(c, bn)
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert rel_err(c(x), ref(x)) < 1e-5


def test_resnet20_pairs():
    pairs = find_conv_bn_pairs(lowbit.create_model("resnet20", width=4))
    assert len(pairs) == 21  # stem + 9 blocks x 2 + 2 option-B (1x1 conv) shortcuts
    assert ("conv1", "bn1") in pairs
    assert ("layers.1.0.shortcut.0", "layers.1.0.shortcut.1") in pairs
    assert ("layers.2.0.shortcut.0", "layers.2.0.shortcut.1") in pairs
    assert ("layers.0.2.conv2", "layers.0.2.bn2") in pairs
    for conv, bn in pairs:
        assert conv.rpartition(".")[0] == bn.rpartition(".")[0]  # same block


class SharedOutputs(nn.Module):
    """Conv outputs used twice / a BN module called twice: neither may be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.d = nn.Conv2d(4, 4, 1)
        self.bn_d = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x)
        y = self.bn_a(y) + y                              # conv output used twice
        y = self.bn_shared(self.b(y)) + self.bn_shared(self.c(y))  # one BN module used twice
        y = self.bn_d(self.d(y))                           # the only legal pair
        return self.fc(y.mean((2, 3)))


def test_unsafe_pairs_are_not_folded():
    model = randomize_bn(SharedOutputs(), seed=2).eval()
    assert find_conv_bn_pairs(model) == [("d", "bn_d")]
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    x = calib_tensor(4)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5
    assert isinstance(folded.bn_a, nn.BatchNorm2d) and isinstance(folded.bn_shared, nn.BatchNorm2d)


def test_untraceable_model_gives_no_pairs_with_warning(untraceable):
    with pytest.warns(UserWarning, match="cannot be traced"):
        assert find_conv_bn_pairs(untraceable) == []
    with pytest.warns(UserWarning, match="cannot be traced"):
        assert fold_batchnorm(untraceable) == []
    assert isinstance(untraceable.bn1, nn.BatchNorm2d)
    with pytest.warns(UserWarning, match="cannot be traced"):
        assert equalize(untraceable) == []


def test_traceable_models_do_not_warn(any_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_conv_bn_pairs(any_model)


# ---------------------------------------------------------------- cross-layer equalization

def _ranges(first: nn.Conv2d, second: nn.Conv2d):
    r1 = first.weight.detach().abs().flatten(1).amax(1)
    w2 = second.weight.detach().abs()
    r2 = w2.transpose(0, 1).flatten(1).amax(1) if second.groups == 1 else w2.flatten(1).amax(1)
    return r1, r2


def _objective(first, second) -> float:
    """Nagel et al.'s sum_i (r1_i / R1) (r2_i / R2): 1 per channel when perfectly balanced."""
    r1, r2 = _ranges(first, second)
    return ((r1 / r1.max()) * (r2 / r2.max())).sum().item()


def _folded(name: str) -> nn.Module:
    model = randomize_bn(make_zoo(name), seed=7, spread=2.5)  # gammas over e^-2.5 .. e^2.5
    fold_batchnorm(model)
    return model


@pytest.mark.parametrize("name", ["resnet20", "shufflenetv2", "mobilenetv2"])
def test_equalize_keeps_fp_output(name):
    model = _folded(name)
    x = calib_tensor(8)
    eq = copy.deepcopy(model)
    pairs = equalize(eq)
    assert pairs, "every zoo model has at least one conv -> (ReLU) -> conv pair"
    changed = [a for a, _ in pairs if not torch.equal(eq.get_submodule(a).weight, model.get_submodule(a).weight)]
    assert changed
    with torch.no_grad():
        assert rel_err(eq(x), model(x)) < 1e-4


def test_equalize_balances_ranges():
    model = _folded("resnet20")
    eq = copy.deepcopy(model)
    pairs = equalize(eq)
    assert len(pairs) == 9  # conv1 -> ReLU -> conv2 inside each basic block
    for a, b in pairs:
        before = _objective(model.get_submodule(a), model.get_submodule(b))
        after = _objective(eq.get_submodule(a), eq.get_submodule(b))
        assert after >= before - 1e-6
        # at the fixed point both layers have the same range per channel
        r1, r2 = _ranges(eq.get_submodule(a), eq.get_submodule(b))
        assert torch.allclose(r1, r2, rtol=1e-4)
        # the first layer's per-channel spread shrinks
        r1_before, _ = _ranges(model.get_submodule(a), model.get_submodule(b))
        assert (r1.max() / r1.min()) < (r1_before.max() / r1_before.min())
    total_before = sum(_objective(model.get_submodule(a), model.get_submodule(b)) for a, b in pairs)
    total_after = sum(_objective(eq.get_submodule(a), eq.get_submodule(b)) for a, b in pairs)
    assert total_after > 1.2 * total_before


def test_equalization_pairs_skip_relu6_and_grouped():
    # MobileNetV2 has ReLU6 between its convs (not positively homogeneous), ZooFreeNet's
    # only conv -> ReLU -> conv path starts at a grouped conv: neither may be paired.
    mb = _folded("mobilenetv2")
    # every expand -> depthwise -> project chain has ReLU6 in between; the only legal pair is
    # the linear (no activation) projection of the last block into the final 1x1 conv
    assert find_equalization_pairs(mb) == [("features.17.conv.2", "features.18.0")]
    sh = _folded("shufflenetv2")
    pairs = find_equalization_pairs(sh)
    assert ("stages.0.right.0", "stages.0.right.3") in pairs   # 1x1 -> ReLU -> depthwise
    assert ("stages.0.right.3", "stages.0.right.5") in pairs   # depthwise -> 1x1 (linear)
    zf = make_model("zoofree")
    fold_batchnorm(zf)
    assert find_equalization_pairs(zf) == []


def test_quantize_with_equalize_records_pairs(resnet20):
    x = calib_tensor(16)
    q = lowbit.quantize(resnet20, x, w_bits=8, a_bits=8, equalize=True)
    assert len(q.lowbit_info["equalized_pairs"]) == 9
    q_ref = lowbit.quantize(resnet20, x, w_bits=8, a_bits=8)
    assert q_ref.lowbit_info["equalized_pairs"] == []
    with torch.no_grad():
        ref = resnet20(x)
        assert rel_err(q(x), ref) < 0.05


class SharedConv(nn.Module):
    """The conv ``b`` is applied twice (weight sharing), each time followed by another conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.a(x))
        u = self.c(F.relu(self.b(h)))
        v = self.d(F.relu(self.b(h * 0.5 + 1)))
        return self.fc(torch.cat([u, v], 1).mean((2, 3)))


def test_equalize_keeps_output_with_shared_conv():
    torch.manual_seed(0)
    model = SharedConv().eval()
    with torch.no_grad():
        model.b.weight.mul_(torch.tensor([10.0, 0.1, 3.0, 0.3]).view(-1, 1, 1, 1))
    eq = copy.deepcopy(model)
    equalize(eq)
    x = calib_tensor(4)
    with torch.no_grad():
        assert rel_err(eq(x), model(x)) < 1e-4
