"""torch's global random generators, forked for a seeded run and given back to the caller after."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def private_global_rng(seed: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block on torch's global RNG, seeded with ``seed``, and give the caller's state back after.

    Layers such as dropout and weight initialisers draw from the global generators (the CPU one,
    and on a GPU the generator of that device), which cannot be handed a ``torch.Generator``. This
    forks exactly those (``fork_rng`` restores them on exit, also on an exception), so seeded,
    reproducible training leaves the caller's random state as it was. ``seed`` None: fork only.
    """
    device = torch.device(device)
    cuda = [_cuda_index(device)] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            seed_global_rng(seed, device)
        yield


def seed_global_rng(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed the global CPU generator and, for a CUDA ``device``, that device's generator only.

    ``torch.manual_seed`` would reseed every CUDA device, including ones ``private_global_rng``
    did not fork, so it is not used here.
    """
    device = torch.device(device)
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(_cuda_index(device)):
            torch.cuda.manual_seed(seed)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()

