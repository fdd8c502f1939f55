"""Validation of options by their declared types, in one place.

Every configuration dataclass (``QuantConfig``, ``QatConfig``) and every method's options
dataclass is checked here against its field annotations, so that ``fold_bn="no"`` or
``iters="4"`` is refused with a ``LowbitError`` naming the option instead of being taken as
true or failing deep inside a method. Supported annotations:

- ``bool``: a real bool only (``"no"``, ``0`` and ``1`` are refused);
- ``int``: an integer, not a bool (numpy integers are accepted and stored as ``int``);
- ``float``: a finite int or float, not a bool (stored as ``float``);
- ``str``, ``Literal["a", "b"]`` (choices), ``X | None``, unions;
- ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``Sequence[X]`` (a list or tuple, not a
  string), ``dict[K, V]`` / ``Mapping[K, V]``;
- ``Any``, plain classes (``isinstance``) and ``Callable`` (``callable``);
- ``Annotated[T, Range(...)]``: ``T`` plus a declared numeric range, e.g.
  ``Annotated[int, Range(ge=1)]`` or ``Annotated[float, Range(ge=0, lt=1)]``.

Annotations are resolved once per class (``option_types``); registering a method with an
annotation this module cannot check raises ``TypeError`` at registration, not at use.
"""
from __future__ import annotations

import collections.abc as cabc
import dataclasses
import math
import numbers
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import numpy as np

from .errors import LowbitError

__all__ = ["Range", "option_types", "check_value", "check_fields", "check_options", "describe"]


@dataclass(frozen=True)
class Range:
    """A numeric range declared in an annotation: ``Annotated[int, Range(ge=1, le=16)]``.

    ``ge``/``gt`` bound from below (inclusive/exclusive), ``le``/``lt`` from above.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        if self.ge is not None and self.le is not None and self.gt is None and self.lt is None:
            return f"from {self.ge} to {self.le}"
        parts = [f"{op} {bound}" for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if bound is not None]
        return " and ".join(parts)


_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40


class _Mismatch(Exception):
    """Internal: ``value`` at position ``where`` (``name[2]`` inside a sequence) does not match."""

    def __init__(self, where: str, value: Any) -> None:
        super().__init__(where)
        self.where = where
        self.value = value


_SEQUENCE_ORIGINS = (tuple, list, cabc.Sequence)
_MAPPING_ORIGINS = (dict, cabc.Mapping)


def describe(annotation: Any) -> str:
    """What a value of ``annotation`` must be, in words ("an integer >= 1 or None")."""
    if annotation is Any or annotation is object:
        return "anything"
    if annotation is type(None) or annotation is None:
        return "None"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        base = describe(args[0])
        ranges = [m.describe() for m in args[1:] if isinstance(m, Range)]
        if not ranges:
            return base
        none = base.endswith(" or None")
        base = base[: -len(" or None")] if none else base
        return f"{base} {' and '.join(ranges)}" + (" or None" if none else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        words = [describe(a) for a in args if a is not type(None)]
        return " or ".join(words + (["None"] if type(None) in args else []))
    if annotation is bool:
        return "True or False"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if origin in _SEQUENCE_ORIGINS:
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a tuple of {len(args)} items ({', '.join(describe(a) for a in args)})"
        return f"a list or tuple of items that are each {describe(args[0]) if args else 'anything'}"
    if origin in _MAPPING_ORIGINS:
        return "a dict" + (f" of {describe(args[0])} to {describe(args[1])}" if args else "")
    if origin is cabc.Callable or annotation is cabc.Callable:
        return "a callable"
    if isinstance(annotation, type):
        return f"a {annotation.__name__}"
    return repr(annotation)


def _check(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` (normalized: numpy scalars to Python, lists to tuples) or raise _Mismatch."""
    if annotation is Any or annotation is object:
        return value
    if annotation is type(None) or annotation is None:
        if value is None:
            return None
        raise _Mismatch(where, value)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        value = _check(value, args[0], where)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            for meta in args[1:]:
                if isinstance(meta, Range) and not meta.contains(value):
                    raise _Mismatch(where, value)
        return value
    if origin is Literal:
        # type-exact: True must not pass for Literal[1], nor 1 for Literal[True]
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return value
        raise _Mismatch(where, value)
    if origin in (Union, types.UnionType):
        nested = None
        for member in args:
            try:
                return _check(value, member, where)
            except _Mismatch as bad:
                if bad.where != where:  # the right kind of container, with a wrong item: report the item
                    nested = nested or bad
        raise nested or _Mismatch(where, value)
    if annotation is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise _Mismatch(where, value)
    if annotation is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        raise _Mismatch(where, value)
    if annotation is float:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                raise _Mismatch(where, value) from None
            if math.isfinite(number):
                return number
        raise _Mismatch(where, value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(where, value)
    if origin in _SEQUENCE_ORIGINS:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(where, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(where, value)
            return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)  # tuples keep frozen configs hashable
    if origin in _MAPPING_ORIGINS:
        if not isinstance(value, cabc.Mapping):
            raise _Mismatch(where, value)
        key_t, val_t = args if args else (Any, Any)
        return {_check(k, key_t, f"{where} key"): _check(v, val_t, f"{where}[{k!r}]") for k, v in value.items()}
    if origin is cabc.Callable or annotation is cabc.Callable:
        if callable(value):
            return value
        raise _Mismatch(where, value)
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch(where, value)
    raise TypeError(f"lowbit cannot check values against the annotation {annotation!r}")


def _supported(annotation: Any) -> None:
    """Raise TypeError when ``annotation`` (or a part of it) is not one ``_check`` understands."""
    if annotation in (Any, object, None, type(None), bool, int, float, str, cabc.Callable):
        return
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        _supported(args[0])
        return
    if origin is Literal:
        return
    if origin in (Union, types.UnionType) or origin in _SEQUENCE_ORIGINS or origin in _MAPPING_ORIGINS:
        for a in args:
            if a is not Ellipsis:
                _supported(a)
        return
    if origin is cabc.Callable or (isinstance(annotation, type) and origin is None):
        return
    raise TypeError(f"lowbit cannot check values against the annotation {annotation!r}")


_TYPES_CACHE: dict[type, dict[str, Any]] = {}


def option_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every init field of dataclass ``cls`` (cached).

    Raises:
        TypeError: ``cls`` is not a dataclass, an annotation cannot be resolved (a name not
            importable from the class's module) or is of a kind this module cannot check.
    """
    cached = _TYPES_CACHE.get(cls)
    if cached is not None:
        return cached
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"options of lowbit methods must be a dataclass, got {cls!r}")
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except NameError as exc:
        raise TypeError(f"cannot resolve the annotations of {cls.__qualname__}: {exc}") from None
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        _supported(hints[f.name])
        out[f.name] = hints[f.name]
    _TYPES_CACHE[cls] = out
    return out


def check_value(value: Any, annotation: Any, name: str, owner: str) -> Any:
    """Check one option; return it normalized (e.g. ``numpy.int64(3)`` -> ``3``, a list -> tuple).

    Raises:
        LowbitError: "<owner>: option <name> must be <what>, got <value> (<type>)".
    """
    try:
        return _check(value, annotation, name)
    except _Mismatch as bad:
        nested = f" (at {bad.where})" if bad.where != name else ""  # a sequence or dict item failed
        raise LowbitError(f"{owner}: option {name} must be {describe(annotation)}, got "
                          f"{_short.repr(bad.value)} ({type(bad.value).__name__}){nested}") from None


def check_options(cls: type, given: dict[str, Any], owner: str) -> dict[str, Any]:
    """Check the values ``given`` for fields of dataclass ``cls``; return them normalized.

    Names that are not fields are passed through untouched (the caller reports unknown names).
    """
    types_ = option_types(cls)
    return {k: check_value(v, types_[k], k, owner) if k in types_ else v for k, v in given.items()}


def check_fields(obj: Any, owner: str | None = None) -> None:
    """Check every field of dataclass instance ``obj`` in place (call first in ``__post_init__``).

    Normalized values are written back, which also works on frozen dataclasses.
    """
    owner = owner or type(obj).__name__
    for name, annotation in option_types(type(obj)).items():
        value = getattr(obj, name)
        checked = check_value(value, annotation, name, owner)
        if checked is not value:
            object.__setattr__(obj, name, checked)
