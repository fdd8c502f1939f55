"""``lowbit.quantize`` leaves torch's global random state alone (issue 14, item 12).

Every PTQ method draws from its own ``torch.Generator`` objects seeded from ``cfg.seed``: the
caller's CPU and CUDA generators are neither read, advanced, reseeded nor saved and restored
(``fork_rng`` would rewind draws other threads made meanwhile), and results stay deterministic.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lowbit

from .conftest import TINY_METHOD_OPTIONS, calib_tensor, make_model

TINY = TINY_METHOD_OPTIONS


def _model() -> nn.Module:
    return make_model("zoofree")  # grouped, depthwise, residual, chunk/split/cat: fast on one core


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class GlobalRngSpy(TorchDispatchMode):
    """Records every random ATen op that runs without an explicit generator (i.e. on a global one)."""

    def __init__(self) -> None:
        super().__init__()
        self.global_draws: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            flat, _ = tree_flatten((args, kwargs))
            on_meta = kwargs.get("device") == torch.device("meta") or any(
                isinstance(a, torch.Tensor) and a.is_meta for a in flat)  # meta tensors draw nothing
            if not on_meta and not any(isinstance(a, torch.Generator) for a in flat):
                self.global_draws.append(str(func))
        return func(*args, **kwargs)


def test_every_method_is_covered() -> None:
    assert sorted(TINY) == lowbit.methods()


@pytest.mark.parametrize("method", sorted(TINY))
def test_method_leaves_the_global_generators_alone_and_repeats_exactly(method: str) -> None:
    """No draw from a global generator, the caller's CPU state as it was, and a second call made
    from another global state gives the identical model (one test per method: two runs, not four)."""
    fp, calib = _model(), calib_tensor(8)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    spy = GlobalRngSpy()
    with spy:
        first = lowbit.quantize(fp, calib, 4, 4, method=method, **TINY[method])
    assert spy.global_draws == []
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)  # a different global state must not matter
    torch.rand(1000)
    second = lowbit.quantize(fp, calib, 4, 4, method=method, **TINY[method])
    assert _same(first, second)


def test_quantize_never_seeds_or_forks_global_generators(monkeypatch) -> None:
    """In particular not CUDA's: ``torch.manual_seed`` reseeds every CUDA device, fork_rng(devices=[])
    restores only the CPU one. (On a CPU-only machine the CUDA seeding is queued, so spy on the calls.)"""
    calls: list[str] = []

    def spy(name: str, real):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return wrapper

    fp, calib = _model(), calib_tensor(8)
    for owner, name in [(torch, "manual_seed"), (torch.random, "manual_seed"), (torch.random, "fork_rng"),
                        (torch.cuda, "manual_seed"), (torch.cuda, "manual_seed_all"), (torch, "seed")]:
        monkeypatch.setattr(owner, name, spy(f"{owner.__name__}.{name}", getattr(owner, name)))
    for method in ("minmax", "qdrop"):
        lowbit.quantize(fp, calib, 4, 4, method=method, **TINY[method])
    assert calls == []


def test_qdrop_masks_matter() -> None:
    """The masks change the result (so the determinism and thread tests are not vacuous)."""
    fp, calib = _model(), calib_tensor(8)
    opts = {"iters": 6, "batch_size": 8}  # same batches, rounding and step learning: only the masks differ
    with_masks = lowbit.quantize(fp, calib, 4, 4, method="qdrop", **opts)
    without = lowbit.quantize(fp, calib, 4, 4, method="brecq", **opts)
    assert not _same(with_masks, without)


def test_qdrop_in_a_thread_matches_a_solo_run_while_the_caller_draws() -> None:
    fp, calib = _model(), calib_tensor(8)
    opts = {"iters": 30, "batch_size": 8}
    solo = lowbit.quantize(fp, calib, 4, 4, method="qdrop", **opts)
    result: dict[str, nn.Module] = {}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            result["q"] = lowbit.quantize(fp, calib, 4, 4, method="qdrop", **opts)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    torch.manual_seed(99)
    draws = []
    thread = threading.Thread(target=work)
    thread.start()
    while thread.is_alive() or len(draws) < 5:
        draws.append(torch.rand(64))  # the caller keeps using the global RNG meanwhile
        time.sleep(0.002)  # (and lets the quantizing thread have the GIL)
    thread.join()
    assert not errors, errors
    assert _same(result["q"], solo)
    # and the caller's own stream was neither reseeded nor rewound by the quantization
    torch.manual_seed(99)
    assert all(torch.equal(d, torch.rand(64)) for d in draws)


@pytest.mark.cuda
@pytest.mark.parametrize("method", sorted(TINY))
def test_caller_cuda_rng_state_is_untouched(method: str) -> None:
    fp, calib = _model(), calib_tensor(8)
    torch.cuda.manual_seed_all(4321)
    torch.rand(3, device="cuda")  # the caller's CUDA stream has advanced somewhere
    cuda_before, cpu_before = torch.cuda.get_rng_state_all(), torch.get_rng_state()
    q = lowbit.quantize(fp, calib, 4, 4, method=method, device="cuda", **TINY[method])
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_before))
    assert torch.equal(torch.get_rng_state(), cpu_before)
    assert next(q.parameters()).device.type == "cuda"


@pytest.mark.cuda
def test_qdrop_on_cuda_is_deterministic(monkeypatch) -> None:
    """The masks come from a CUDA generator seeded from the config, not from the global CUDA state."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # exact repeats of conv backward
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    fp, calib = _model(), calib_tensor(8)
    opts = {"iters": 6, "batch_size": 8}
    torch.cuda.manual_seed_all(1)
    first = lowbit.quantize(fp, calib, 4, 4, method="qdrop", device="cuda", **opts)
    torch.cuda.manual_seed_all(2)
    torch.rand(7, device="cuda")
    second = lowbit.quantize(fp, calib, 4, 4, method="qdrop", device="cuda", **opts)
    assert _same(first, second)
