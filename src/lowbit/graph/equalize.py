"""Cross-layer equalization (Nagel et al. 2019): balance ranges of conv -> ReLU -> conv pairs."""
from __future__ import annotations

import torch
from torch import nn

from .fold import module_calls
from .modules import get_submodule

_PASS_THROUGH_MODULES = (nn.Identity, nn.ReLU)
_PASS_THROUGH_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.relu_}


def _is_plain_or_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 or (conv.groups == conv.in_channels == conv.out_channels)


def find_equalization_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Conv pairs joined only by ReLU/Identity, where the first output feeds nothing else.

    ReLU is positively homogeneous, so scaling a channel by s > 0 before it and 1/s after it
    leaves the function unchanged; ReLU6 is not, so its pairs are skipped.
    """
    nodes, modules, calls = module_calls(model, nn.Conv2d)
    pairs = []
    for node in nodes:
        if calls[node.target] != 1:
            continue
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.op == "call_module" and isinstance(modules.get(nxt.target), _PASS_THROUGH_MODULES):
                cur = nxt
                continue
            if nxt.op == "call_function" and nxt.target in _PASS_THROUGH_FUNCTIONS:
                cur = nxt
                continue
            if (nxt.op == "call_module" and isinstance(modules.get(nxt.target), nn.Conv2d) and nxt.args[0] is cur
                    and calls[nxt.target] == 1):
                first, second = modules[node.target], modules[nxt.target]
                if _is_plain_or_depthwise(first) and _is_plain_or_depthwise(second) \
                        and first.out_channels == second.in_channels:
                    pairs.append((node.target, nxt.target))
            break
    return pairs


@torch.no_grad()
def equalize_pair(first: nn.Conv2d, second: nn.Conv2d) -> None:
    """Rescale channel i: W1[i] / s_i, b1[i] / s_i, W2[:, i] * s_i with s_i = sqrt(r1 r2) / r2."""
    r1 = first.weight.abs().flatten(1).amax(1)
    if second.groups == 1:
        r2 = second.weight.abs().transpose(0, 1).flatten(1).amax(1)
    else:
        r2 = second.weight.abs().flatten(1).amax(1)
    valid = (r1 > 0) & (r2 > 0)
    s = torch.where(valid, torch.sqrt(r1 * r2) / r2.clamp_min(1e-12), torch.ones_like(r1))
    first.weight.div_(s.view(-1, 1, 1, 1))
    if first.bias is not None:
        first.bias.div_(s)
    if second.groups == 1:
        second.weight.mul_(s.view(1, -1, 1, 1))
    else:
        second.weight.mul_(s.view(-1, 1, 1, 1))


def equalize(model: nn.Module, iterations: int = 10) -> list[tuple[str, str]]:
    """Equalize all eligible pairs of ``model`` in place (a few sweeps); returns the pairs."""
    pairs = find_equalization_pairs(model)
    for _ in range(iterations):
        for a, b in pairs:
            equalize_pair(get_submodule(model, a), get_submodule(model, b))
    return pairs
