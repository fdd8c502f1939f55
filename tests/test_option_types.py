"""Every config field and method option is checked against its declared type, in one place.

The wrong-type probes are generated here from the annotations with an independent, small reader
of ``typing`` (not ``lowbit.options``), so a field whose check is missing fails its own case.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, QuantConfig
from lowbit.config import build_config
from lowbit.options import Range, check_fields, check_options, check_value, describe, option_types
from lowbit.ptq.registry import _METHODS, get_method, methods, register_method
from lowbit.qat.engine import QatConfig
from lowbit.qat.registry import get_qat_method, qat_methods
from tests.conftest import calib_tensor


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


X = calib_tensor(4)
Y = torch.tensor([0, 1, 2, 0])


# ---------------------------------------------------------------- probes from annotations

def _wrong_values(annotation: Any) -> list[Any]:
    """Values that do not match ``annotation``: other types, out-of-range numbers, unknown choices."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        base, metas = args[0], [m for m in args[1:] if isinstance(m, Range)]
        out = _wrong_values(base)
        for r in metas:
            kind = int if base is int else float
            step = 1 if kind is int else 0.5
            if r.ge is not None:
                out.append(kind(r.ge - step))
            if r.gt is not None:
                out.append(kind(r.gt))
            if r.le is not None:
                out.append(kind(r.le + step))
            if r.lt is not None:
                out.append(kind(r.lt))
        return out
    if origin is Literal:
        return ["no-such-choice", 3, None]
    if origin in (typing.Union, __import__("types").UnionType):
        members = [a for a in args if a is not type(None)]
        candidates = [v for m in members for v in _wrong_values(m)]
        # a value is wrong for the union only when no member accepts it
        return [v for v in candidates if not any(_accepts(m, v) for m in args)]
    if annotation is bool:
        return ["no", "False", 1, 0, None]
    if annotation is int:
        return ["4", 2.5, True, None]
    if annotation is float:
        return ["0.5", True, None, math.nan, math.inf]
    if annotation is str:
        return [3, True, None]
    if annotation is torch.device:
        return [3, None]
    raise AssertionError(f"test cannot probe {annotation!r}; teach _wrong_values")


def _accepts(annotation: Any, value: Any) -> bool:
    """Independent reference: does ``value`` match ``annotation`` (incl. declared ranges)?"""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin is Annotated:
        if not _accepts(args[0], value):
            return False
        if value is None:
            return True
        return all(not isinstance(r, Range) or (
            (r.ge is None or value >= r.ge) and (r.gt is None or value > r.gt)
            and (r.le is None or value <= r.le) and (r.lt is None or value < r.lt)) for r in args[1:])
    if origin is Literal:
        return any(type(value) is type(c) and value == c for c in args)
    if origin in (typing.Union, __import__("types").UnionType):
        return any(_accepts(a, value) for a in args)
    if annotation is bool:
        return type(value) is bool
    if annotation is int:
        return type(value) is int
    if annotation is float:
        return type(value) in (int, float) and math.isfinite(value)
    if annotation is str:
        return type(value) is str
    return isinstance(value, annotation)


def _probes(cls: type) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out, seen = [], set()
    for f in dataclasses.fields(cls):
        for bad in _wrong_values(hints[f.name]):
            assert not _accepts(hints[f.name], bad), (f.name, bad)
            if (f.name, type(bad), repr(bad)) not in seen:  # True and 1 are different probes
                seen.add((f.name, type(bad), repr(bad)))
                out.append((f.name, hints[f.name], bad))
    return out


def _method_probes() -> list:
    cases = []
    for kind, names, get in (("ptq", methods(), get_method), ("qat", qat_methods(), get_qat_method)):
        for name in names:
            spec = get(name)
            if spec.options is None:
                continue
            for field, _, bad in _probes(spec.options):
                cases.append(pytest.param(kind, name, field, bad, id=f"{kind}-{name}-{field}={bad!r}"))
    return cases


METHOD_PROBES = _method_probes()
CONFIG_PROBES = [pytest.param(f, bad, id=f"{f}={bad!r}") for f, _, bad in _probes(QuantConfig)]
QAT_CONFIG_PROBES = [pytest.param(f, bad, id=f"{f}={bad!r}") for f, _, bad in _probes(QatConfig)]


def test_every_option_of_every_method_is_probed() -> None:
    probed = {(c.values[1], c.values[2]) for c in METHOD_PROBES}
    for kind, names, get in (("ptq", methods(), get_method), ("qat", qat_methods(), get_qat_method)):
        for name in names:
            opts = get(name).options
            for f in dataclasses.fields(opts) if opts else ():
                assert (name, f.name) in probed, (name, f.name)
    assert {f.name for f in dataclasses.fields(QuantConfig)} == {c.values[0] for c in CONFIG_PROBES}
    assert {f.name for f in dataclasses.fields(QatConfig)} == {c.values[0] for c in QAT_CONFIG_PROBES}
    assert len(METHOD_PROBES) > 150


@pytest.mark.parametrize("kind, method, option, bad", METHOD_PROBES)
def test_wrong_method_option_is_refused_by_name(kind: str, method: str, option: str, bad: Any) -> None:
    with pytest.raises(LowbitError) as info:
        if kind == "ptq":
            lowbit.quantize(_tiny(), X, method=method, **{option: bad})
        else:
            lowbit.qat(_tiny(), (X, Y), method=method, epochs=1, log=lambda s: None, **{option: bad})
    msg = str(info.value)
    assert option in msg and repr(method) in msg, msg


@pytest.mark.parametrize("field, bad", CONFIG_PROBES)
def test_wrong_config_field_is_refused_by_name(field: str, bad: Any) -> None:
    with pytest.raises(LowbitError, match=rf"\b{field}\b"):
        QuantConfig(**{field: bad})
    with pytest.raises(LowbitError, match=rf"\b{field}\b"):
        lowbit.quantize(_tiny(), X, **{field: bad})


@pytest.mark.parametrize("field, bad", QAT_CONFIG_PROBES)
def test_wrong_qat_config_field_is_refused_by_name(field: str, bad: Any) -> None:
    with pytest.raises(LowbitError, match=rf"\b{field}\b"):
        QatConfig(**{field: bad})


# ---------------------------------------------------------------- the cases of issue 14, item 3

@pytest.mark.parametrize("options, names", [
    ({"fold_bn": "no"}, ["fold_bn"]),
    ({"w_symmetric": "False"}, ["w_symmetric"]),
    ({"quantize_all": "no"}, ["quantize_all"]),
    ({"quantize_all": 1}, ["quantize_all"]),
    ({"groups": 4}, ["groups", "granularity='group'"]),
    ({"granularity": "tensor", "groups": 2}, ["groups", "granularity='group'"]),
    ({"method": "bitsplit", "iters": "4"}, ["iters", "'bitsplit'"]),
    ({"method": "mse", "candidates": 2.5}, ["candidates", "'mse'"]),
    ({"calib_size": "10"}, ["calib_size"]),
    ({"seed": "a"}, ["seed"]),
    ({"batch_size": 2.5}, ["batch_size"]),
    ({"method": "brecq", "max_block_layers": 0}, ["max_block_layers", "'brecq'"]),
    ({"method": "distill", "augment": "no"}, ["augment", "'distill'"]),
    ({"input_key": 3}, ["input_key"]),
])
def test_issue_cases_are_refused_with_the_option_named(options: dict, names: list[str]) -> None:
    with pytest.raises(LowbitError) as info:
        lowbit.quantize(_tiny(), X, **options)
    for name in names:
        assert name in str(info.value), str(info.value)


def test_qat_options_of_the_wrong_type() -> None:
    for options, name in (({"epochs": "3"}, "epochs"), ({"lr": "0.1"}, "lr"), ({"augment": "no"}, "augment"),
                          ({"max_steps": 2.5}, "max_steps"), ({"grad_scale": "no"}, "grad_scale"),
                          ({"fold_bn": "no"}, "fold_bn"), ({"target_key": 1}, "target_key")):
        with pytest.raises(LowbitError, match=name):
            lowbit.qat(_tiny(), (X, Y), method="lsq", log=lambda s: None, **options)


# ---------------------------------------------------------------- valid values still work

def test_valid_values_work_and_are_normalized() -> None:
    q = lowbit.quantize(_tiny(), X, method="mse", candidates=np.int64(5), p_act=2, shrink=np.float32(0.02),
                        fold_bn=False, w_symmetric=False, seed=np.int32(3), calib_size=4, batch_size=2,
                        device=torch.device("cpu"), a_bits=None)
    opts, cfg = q.lowbit_info["options"], q.lowbit_info["config"]
    assert opts["candidates"] == 5 and type(opts["candidates"]) is int
    assert opts["p_act"] == 2.0 and type(opts["p_act"]) is float
    assert type(opts["shrink"]) is float
    assert cfg["fold_bn"] is False and cfg["w_symmetric"] is False and cfg["a_bits"] is None
    assert type(cfg["seed"]) is int and cfg["device"] == "cpu"
    q = lowbit.quantize(_tiny(), X, quantize_all=True, granularity="group", groups=2)
    assert q.lowbit_info["config"]["first_last_bits"] is None and q.lowbit_info["config"]["quantize_input"]


def test_every_default_is_valid_and_boundary_values_pass() -> None:
    for names, get in ((methods(), get_method), (qat_methods(), get_qat_method)):
        for name in names:
            spec = get(name)
            assert spec.make_options({}) == (spec.options() if spec.options else None)
    check_fields(QuantConfig())
    check_fields(QatConfig())
    assert get_method("brecq").make_options({"cache_mb": 0, "warmup": 0, "drop_prob": 0.0}).cache_mb == 0
    assert get_method("mse").make_options({"candidates": 1}).candidates == 1
    assert QuantConfig(w_bits=16, a_bits=1, first_last_bits=1, seed=2**32 - 1).w_bits == 16


def test_groups_from_a_config_object_give_way_to_a_new_granularity() -> None:
    base = QuantConfig(granularity="group", groups=4)
    cfg, _ = build_config(4, 4, {"config": base, "granularity": "channel"})
    assert cfg.granularity == "channel" and cfg.groups is None
    cfg, _ = build_config(4, 4, {"config": base, "groups": 2})
    assert cfg.granularity == "group" and cfg.groups == 2
    with pytest.raises(LowbitError, match="granularity='group'"):
        build_config(4, 4, {"config": base, "granularity": "channel", "groups": 2})


def test_quantize_all_contradicting_explicit_fields() -> None:
    with pytest.raises(LowbitError, match="quantize_all.*first_last_bits"):
        build_config(4, 4, {"quantize_all": True, "first_last_bits": 8})
    cfg, _ = build_config(4, 4, {"quantize_all": True, "first_last_bits": None})
    assert cfg.first_last_bits is None and cfg.quantize_input
    cfg, _ = build_config(4, 4, {"quantize_all": False})
    assert cfg.first_last_bits == 8 and not cfg.quantize_input


def test_build_config_lives_with_the_config() -> None:
    import lowbit.api
    import lowbit.config

    assert lowbit.api.build_config is lowbit.config.build_config
    assert build_config.__module__ == "lowbit.config"


def test_qat_accepts_path_objects_for_paths(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"  # QatConfig.checkpoint is a str; lowbit.qat takes os.PathLike too
    q = lowbit.qat(_tiny(), (X, Y), method="lsq", epochs=2, batch_size=4, log=lambda s: None, checkpoint=ckpt,
                   max_steps=1)
    assert ckpt.exists() and not lowbit.record_of(q).qat["finished"]


@dataclass(frozen=True)
class _BatchOptions:
    batch_size: int = 3


def _record(qmodel, calib, cfg, opts) -> None:
    qmodel.seen = (cfg.batch_size, opts.batch_size)


def test_a_method_option_wins_over_a_config_field_of_the_same_name() -> None:
    # brecq, qdrop and distill have a batch_size (images per step) as QuantConfig does (forward passes)
    for name in ("brecq", "qdrop", "distill"):
        spec = get_method(name)
        cfg, rest = build_config(4, 4, {"batch_size": 8}, spec.option_names)
        assert rest == {"batch_size": 8} and cfg.batch_size == QuantConfig().batch_size
        assert spec.make_options(rest).batch_size == 8
    register_method("test-batch-options", _BatchOptions)(_record)
    try:
        q = lowbit.quantize(_tiny(), X, method="test-batch-options", batch_size=8)
        assert q.seen == (256, 8)
        q = lowbit.quantize(_tiny(), X, method="test-batch-options", config=QuantConfig(batch_size=2), batch_size=8)
        assert q.seen == (2, 8)
    finally:
        _METHODS.pop("test-batch-options", None)
    # QAT: gdrq's momentum (of its activation threshold) is not QatConfig's SGD momentum
    spec = get_qat_method("gdrq")
    assert "momentum" in spec.option_names
    with pytest.raises(LowbitError, match="method 'gdrq': option momentum"):
        lowbit.qat(_tiny(), (X, Y), method="gdrq", log=lambda s: None, momentum=1.5)


# ---------------------------------------------------------------- the checker itself

@dataclass(frozen=True)
class _Typed:
    sizes: tuple[Annotated[int, Range(ge=1)], ...] = (1, 2)
    pair: tuple[int, str] = (1, "a")
    names: Sequence[str] = ("a",)
    weights: dict[str, float] | None = None
    mode: Literal["fast", "slow"] = "fast"
    flag: Literal[True] | None = None
    anything: Any = None


def _never_called(qmodel, calib, cfg, opts) -> None:  # pragma: no cover - options fail first
    raise AssertionError("not reached")


@pytest.fixture
def typed_method():
    """A user-registered method with structured options (removed again afterwards)."""
    register_method("test-typed-options", _Typed, description="test only")(_never_called)
    yield "test-typed-options"
    _METHODS.pop("test-typed-options", None)


@pytest.mark.parametrize("option, bad, where", [
    ("sizes", (1, 0), "sizes[1]"),
    ("sizes", (1, "2"), "sizes[1]"),
    ("sizes", "12", None),
    ("pair", (1, 2), "pair[1]"),
    ("pair", (1, "a", 3), None),
    ("names", "abc", None),
    ("names", ["a", 3], "names[1]"),
    ("weights", {"a": "x"}, "weights['a']"),
    ("weights", {1: 0.5}, "weights key"),
    ("mode", "medium", None),
    ("flag", 1, None),
])
def test_registered_method_with_structured_options(typed_method: str, option: str, bad: Any, where: str | None) -> None:
    with pytest.raises(LowbitError, match=rf"method '{typed_method}': option {option} must be") as info:
        lowbit.quantize(_tiny(), X, method=typed_method, **{option: bad})
    if where:
        assert f"(at {where})" in str(info.value)


def test_structured_options_are_normalized() -> None:
    got = check_options(_Typed, {"sizes": [3, np.int64(4)], "names": ["x"], "weights": {"a": 1},
                                       "flag": True, "anything": object}, "m")
    assert got["sizes"] == (3, 4) and type(got["sizes"][1]) is int
    assert got["names"] == ("x",) and got["weights"] == {"a": 1.0} and got["flag"] is True


_T = typing.TypeVar("_T")


@dataclass
class _GenericOptions:
    x: _T = None  # type: ignore[valid-type]


@dataclass
class _SetOptions:
    values: set = dataclasses.field(default_factory=set)


def test_unsupported_annotation_fails_at_registration() -> None:
    with pytest.raises(TypeError, match="cannot check"):
        register_method("test-unsupported", _GenericOptions)(_never_called)
    assert "test-unsupported" not in _METHODS

    @dataclass
    class Local:
        x: _Unknown = None  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(TypeError, match="cannot resolve"):
        register_method("test-unsupported", Local)(_never_called)
    assert "test-unsupported" not in _METHODS
    assert option_types(_SetOptions) == {"values": set}  # a plain class is checked with isinstance
    with pytest.raises(LowbitError, match="option values must be a set"):
        check_options(_SetOptions, {"values": [1]}, "m")


def test_describe_and_check_value_messages() -> None:
    assert describe(Annotated[int, Range(ge=1, le=16)] | None) == "an integer from 1 to 16 or None"
    assert describe(Annotated[float, Range(ge=0, lt=1)]) == "a number >= 0 and < 1"
    with pytest.raises(LowbitError, match=r"^ctx: option x must be True or False, got 'no' \(str\)$"):
        check_value("no", bool, "x", "ctx")
    for bad in (float("nan"), float("-inf"), 10 ** 400):
        with pytest.raises(LowbitError, match="a number"):
            check_value(bad, float, "x", "ctx")
    assert check_value(np.bool_(True), bool, "x", "ctx") is True
    assert check_value(os.sep, str, "x", "ctx") == os.sep
