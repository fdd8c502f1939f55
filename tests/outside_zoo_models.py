"""Architectures from the ``pytorchcv`` model zoo as test material (random weights, small inputs).

pytorchcv's model modules are plain PyTorch, written by others: they exercise lowbit's tracing,
folding, surgery, artifact and ONNX paths on graphs nobody here designed. Its top-level provider
imports torchvision, so each model is built from ``pytorchcv.models.<module>`` directly.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

IMAGE_SIZE = 32
NUM_CLASSES = 10


@dataclass(frozen=True)
class Arch:
    """One pytorchcv architecture: ``pytorchcv.models.<module>.<factory>(**kwargs)``."""

    module: str
    factory: str
    kwargs: dict = field(default_factory=dict)
    small: bool = False  # cheap enough for Bit-Split in CI
    onnx_w4: bool = False  # ONNX parity at W4A4 in CI (see ONNX_COVER); one trace costs 1-3 s
    onnx_w8: bool = False  # ONNX parity at W8A8 too in CI (UINT8 weight shift, 8-bit QDQ)


# Which architectures the suite exports to ONNX (benchmarks/outside_zoo.py exports all of them).
# Chosen by coverage, measured on the W4A4 QDQ graphs of all 34 (2026-12-07): together these 14
# produce every ONNX operator type any of the 34 produce (Resize, Slice, Split, LeakyRelu, Mul,
# Sigmoid, Concat, Transpose, AveragePool, MaxPool, ...) and contain every leaf module type
# (ReLU6, HSwish, HSigmoid, GhostHSigmoid, Swish, LeakyReLU, ChannelShuffle, Upsample, grouped and
# depthwise convolutions); SqueezeNext is the one whose deep random stack shows rounding-boundary
# flips, which the code-by-code parity check must tell from real mismatches.
ONNX_COVER = {"condensenet74_c4_g4", "hrnet_w18_small_v1", "sepreresnet10", "dpn68", "mixnet_s", "darknet_tiny",
              "mobilenetv3_small_w7d20", "resnext14_16x4d", "mobilenetv2_wd4", "resnet20_cifar", "sqnxt23_w1",
              "shufflenetv2_wd2", "ghostnet", "hardnet39ds"}
ONNX_W8 = {"resnet20_cifar", "mobilenetv2_wd4", "shufflenetv2_wd2", "sqnxt23_w1"}


# name -> architecture; small variants (width multipliers) where pytorchcv has them
ARCHS: dict[str, Arch] = {
    "resnet10": Arch("resnet", "resnet10", {"width_scale": 0.25}),
    "preresnet10": Arch("preresnet", "preresnet10", {"width_scale": 0.25}),
    "resnet20_cifar": Arch("resnet_cifar", "resnet20_cifar10", small=True),
    "preresnet20_cifar": Arch("preresnet_cifar", "preresnet20_cifar10"),
    "seresnet10": Arch("seresnet", "seresnet10"),
    "sepreresnet10": Arch("sepreresnet", "sepreresnet10"),
    "resnext14_16x4d": Arch("resnext", "resnext14_16x4d"),
    "mobilenet_wd4": Arch("mobilenet", "mobilenet_wd4", small=True),
    "fdmobilenet_wd4": Arch("fdmobilenet", "fdmobilenet_wd4"),
    "mobilenetv2_wd4": Arch("mobilenetv2", "mobilenetv2_wd4"),
    "mobilenetv3_small_w7d20": Arch("mobilenetv3", "mobilenetv3_small_w7d20"),
    "shufflenet_g1_wd4": Arch("shufflenet", "shufflenet_g1_wd4", small=True),
    "shufflenetv2_wd2": Arch("shufflenetv2", "shufflenetv2_wd2"),
    "menet108_8x1_g3": Arch("menet", "menet108_8x1_g3"),
    "igcv3_wd4": Arch("igcv3", "igcv3_wd4"),
    "efficientnet_b0": Arch("efficientnet", "efficientnet_b0"),
    "mixnet_s": Arch("mixnet", "mixnet_s"),
    "ghostnet": Arch("ghostnet", "ghostnet"),
    "regnetx002": Arch("regnet", "regnetx002"),
    "mnasnet_small": Arch("mnasnet", "mnasnet_small"),
    "proxylessnas_mobile": Arch("proxylessnas", "proxylessnas_mobile"),
    "fbnet_cb": Arch("fbnet", "fbnet_cb"),
    "spnasnet": Arch("spnasnet", "spnasnet"),
    "densenet40_k12_cifar": Arch("densenet_cifar", "densenet40_k12_cifar10"),
    "dla46xc": Arch("dla", "dla46xc"),
    "hrnet_w18_small_v1": Arch("hrnet", "hrnet_w18_small_v1"),
    "dpn68": Arch("dpn", "dpn68", {"for_training": True}),
    "vovnet27s": Arch("vovnet", "vovnet27s"),
    "peleenet": Arch("peleenet", "peleenet"),
    "condensenet74_c4_g4": Arch("condensenet", "condensenet74_c4_g4"),
    "squeezenet_v1_1": Arch("squeezenet", "squeezenet_v1_1"),
    "sqnxt23_w1": Arch("squeezenext", "sqnxt23_w1"),
    "darknet_tiny": Arch("darknet", "darknet_tiny"),
    "hardnet39ds": Arch("hardnet", "hardnet39ds"),
}
assert ONNX_COVER | ONNX_W8 <= ARCHS.keys(), "ONNX_COVER / ONNX_W8 name an architecture not in ARCHS"
ARCHS = {name: replace(a, onnx_w4=name in ONNX_COVER, onnx_w8=name in ONNX_W8) for name, a in ARCHS.items()}


def import_arch(arch: Arch):
    """The factory of ``arch`` (raises ImportError when pytorchcv is missing)."""
    return getattr(importlib.import_module(f"pytorchcv.models.{arch.module}"), arch.factory)


def _global_final_pool(model: nn.Module) -> None:
    """pytorchcv sizes its final average pool for 224x224 inputs; make it global for small inputs."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.AvgPool2d) and name.rsplit(".", 1)[-1] == "final_pool":
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, "final_pool", nn.AdaptiveAvgPool2d(1))


@torch.no_grad()
def _spread_channel_indices(model: nn.Module, seed: int) -> None:
    """CondenseNet selects input channels through ``index`` buffers that only pretrained weights fill
    (all zeros otherwise: every output would read channel 0); give them distinct channels."""
    gen = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.rsplit(".", 1)[-1] == "index" and buf.dtype == torch.long and not buf.any():
            buf.copy_(torch.randperm(buf.numel(), generator=gen))


@torch.no_grad()
def set_bn_statistics(model: nn.Module, seed: int = 0, batches: int = 2, batch_size: int = 8) -> nn.Module:
    """Random BN affine parameters, then BN running statistics measured on random images.

    Statistics from the model's own activations keep every layer's output in a sane range however
    deep the random network, so quantization errors are measured on non-trivial activations.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        if bn.affine:
            bn.weight.copy_(torch.exp((torch.rand(bn.num_features, generator=gen) * 2 - 1) * 0.5))
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.2)
        if bn.track_running_stats:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
    model.train()
    for _ in range(batches):
        model(torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def build(name: str, seed: int = 0) -> nn.Module:
    """Seeded random-weight model ``name`` of ``ARCHS`` for 3x32x32 inputs and 10 classes, in eval mode."""
    arch = ARCHS[name]
    factory = import_arch(arch)
    torch.manual_seed(seed)
    model = factory(pretrained=False, num_classes=NUM_CLASSES, **arch.kwargs)
    _global_final_pool(model)
    _spread_channel_indices(model, seed)
    return set_bn_statistics(model, seed)


def images(n: int, seed: int) -> torch.Tensor:
    """``n`` seeded random 3x32x32 images."""
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
