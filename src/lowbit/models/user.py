"""Users' own models: ``file.py:factory``, ``package.module:factory`` or a zoo name, plus their weights.

``load_model(source, kwargs, weights)`` is what ``lowbit quantize/eval/export/qat/sensitivity
--model SOURCE [--model-kwargs JSON] [--weights FILE]`` call. A source is

- a zoo name (``resnet20``): built through the registry; without ``weights`` the shipped
  checkpoint is loaded (``load_pretrained``);
- ``path/to/file.py:factory``: the file is imported as a module (its folder first on
  ``sys.path`` while it is imported and the factory runs, so that it can import its neighbours),
  then ``factory(**kwargs)`` is called;
- ``package.module:factory``: imported with ``importlib`` from ``sys.path`` (the current folder
  included, as ``python -m`` does).

``factory`` is any callable returning an ``nn.Module``: a function or the class itself, also a
dotted attribute (``Nets.small``). Weights are optional for such models (the factory may load its
own); when given they are a safetensors file or a state dict saved with ``torch.save`` and read
with ``torch.load(weights_only=True)`` (nothing is unpickled beyond tensors and containers); a
checkpoint dict holding the state dict under ``state_dict`` or ``model`` is accepted too.

Everything that goes wrong in the user's code (a syntax error, an import error, an exception in
the factory, a missing factory, a factory returning something else than a module) is a
``LowbitError`` naming the file and line, so the command line reports it as one line instead of
a traceback through lowbit.

Not model sources, with the reason in the error: pickled whole models (``torch.save(model)``,
``.pt``/``.pth`` given as ``--model``), since loading them runs arbitrary code; and ``torch.export``
programs (``.pt2``), whose graphs call ATen operators (``aten.conv2d``) instead of holding
``nn.Conv2d``/``nn.Linear`` modules: lowbit quantizes by replacing those modules, so a program
would quantize nothing. Export the model's code and weights instead.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Callable, Iterator

from torch import Tensor, nn

from ..errors import LowbitError

SOURCE_HELP = ("a zoo name (see `lowbit models`), path/to/file.py:factory or package.module:factory "
               "(factory: a function or class returning the nn.Module)")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")


class ModelSource:
    """A parsed ``--model`` value: ``kind`` is "zoo", "file" or "module"."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.kind, self.location, self.attr = _parse(text)

    @property
    def is_zoo(self) -> bool:
        return self.kind == "zoo"

    def __repr__(self) -> str:
        return f"ModelSource({self.text!r})"


def _parse(text: str) -> tuple[str, str, str]:
    """``(kind, location, attribute)`` of a model source; a LowbitError for forms lowbit does not take."""
    from .registry import list_models

    if not isinstance(text, str) or not text.strip():
        raise LowbitError(f"a model source must be {SOURCE_HELP}, got {text!r}")
    text = text.strip()
    lower = text.lower()
    if ":" in text and not (len(text) > 1 and text[1] == ":" and text.count(":") == 1):  # C:\net.py has no factory
        location, attr = text.rsplit(":", 1)
        if not attr or not all(part.isidentifier() for part in attr.split(".")):
            raise LowbitError(f"{text}: {attr!r} after ':' must name the factory (a function or class), "
                              f"e.g. {location}:build")
        if location.lower().endswith(".py") or "/" in location or os.sep in location:
            return "file", location, attr
        if not all(part.isidentifier() for part in location.split(".")):
            raise LowbitError(f"{text}: {location!r} is neither a .py file nor a module name (package.module)")
        return "module", location, attr
    if lower.endswith(".pt2"):
        raise LowbitError(f"{text}: a torch.export program cannot be quantized by lowbit: its graph calls ATen "
                          f"operators (aten.conv2d) instead of holding nn.Conv2d / nn.Linear modules, which lowbit "
                          f"replaces to quantize; pass the model's code as file.py:factory and its weights with "
                          f"--weights")
    if lower.endswith(_PICKLE_SUFFIXES):
        raise LowbitError(f"{text}: lowbit does not load pickled whole models (torch.load of a module runs "
                          f"arbitrary code); pass the model's code as file.py:factory and its weights with --weights "
                          f"(a file of torch.save(model.state_dict()), or safetensors)")
    if lower.endswith(".py"):
        raise LowbitError(f"{text}: name the factory that builds the model, e.g. --model {text}:build")
    if text in list_models():
        return "zoo", text, ""
    hint = ""
    if "." in text and all(part.isidentifier() for part in text.split(".")):
        module, _, attr = text.rpartition(".")
        hint = f" (for a factory in a module write {module}:{attr})"
    raise LowbitError(f"unknown model {text!r}{hint}; a model is {SOURCE_HELP}; zoo models: "
                      f"{', '.join(list_models())}")


Owns = Callable[[str], bool]  # whether a source file is the user's (where their error is reported)


def _owned_by(files: set[str], folder: str | None = None) -> Owns:
    """The files ``files`` (absolute paths), and every file under ``folder`` (a package's)."""
    prefix = None if folder is None else os.path.join(os.path.abspath(folder), "")
    return lambda name: (os.path.abspath(name) in files
                         or (prefix is not None and os.path.abspath(name).startswith(prefix)))


def _frame_in(tb: TracebackType | None, owns: Owns) -> traceback.FrameSummary | None:
    """The innermost frame of ``tb`` in the user's files, else None."""
    found = None
    for frame in traceback.extract_tb(tb):
        if owns(frame.filename):
            found = frame
    return found


def _user_error(exc: BaseException, owns: Owns, what: str) -> LowbitError:
    """One line for an exception raised by the user's code: ``FILE:LINE: what: Type: message``."""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f"{exc.filename}:{exc.lineno}" if exc.lineno else exc.filename
        return LowbitError(f"{where}: {what}: {type(exc).__name__}: {exc.msg}")
    frame = _frame_in(exc.__traceback__, owns)
    if frame is None:  # raised outside the user's file (e.g. in torch, called from elsewhere): its innermost frame
        frames = traceback.extract_tb(exc.__traceback__)
        frame = frames[-1] if frames else None
    where = f"{frame.filename}:{frame.lineno}" if frame is not None else "?"
    if isinstance(exc, SystemExit):
        return LowbitError(f"{where}: {what}: the code called sys.exit({exc.code!r}) (is a script's main code "
                           f"under `if __name__ == \"__main__\":`?)")
    message = str(exc).strip().splitlines()
    return LowbitError(f"{where}: {what}: {type(exc).__name__}" + (f": {message[0]}" if message else ""))


@contextlib.contextmanager
def _on_path(folder: str | None) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the duration (a user file importing its neighbours)."""
    if folder is None or folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _import_file(path: Path) -> ModuleType:
    """Import the file at ``path`` as a fresh module (re-importing a changed file gets the new code)."""
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"lowbit_user_{''.join(c if c.isalnum() else '_' for c in path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise LowbitError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and typing look their module up here
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        sys.modules.pop(name, None)
        raise
    except BaseException as exc:  # noqa: BLE001 -- anything the user's module does at import is theirs
        sys.modules.pop(name, None)
        raise _user_error(exc, _owned_by({str(path)}), f"error while importing {path.name}") from None
    return module


def _import_module(name: str) -> ModuleType:
    """``importlib.import_module(name)`` with the current folder on the path, errors as LowbitError."""
    with _on_path(os.getcwd() if "" not in sys.path else None):
        try:
            return importlib.import_module(name)
        except KeyboardInterrupt:
            raise
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                raise LowbitError(f"no module named {exc.name!r} (for --model {name}:...; run from the folder that "
                                  f"holds it, or set PYTHONPATH)") from None
            raise _user_error(exc, _module_owner(name), f"error while importing {name}") from None
        except BaseException as exc:  # noqa: BLE001 -- the user's module failed at import
            raise _user_error(exc, _module_owner(name), f"error while importing {name}") from None


def _module_owner(name: str) -> Owns:
    """The source files of ``name`` and its parent packages, and all of its top-level package's folder."""
    files: set[str] = set()
    folder = None
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:i]))
        except (ImportError, ValueError):
            break
        if spec is None or not spec.origin:
            break
        files.add(os.path.abspath(spec.origin))
        if i == 1 and spec.submodule_search_locations:
            folder = os.path.dirname(spec.origin)
    return _owned_by(files, folder)


def _factory(module: ModuleType, attr: str, where: str) -> Any:
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = where if i == 0 else f"{where}:{'.'.join(attr.split('.')[:i])}"
            names = sorted(n for n, v in vars(obj).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == getattr(module, "__name__", None)) \
                if hasattr(obj, "__dict__") else []
            raise LowbitError(f"{owner} has no {part!r}" + (f"; it defines: {', '.join(names)}" if names else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise LowbitError(f"{where}:{attr} is a {type(obj).__name__}, not a function or class building the model")
    return obj


def _build(factory: Any, kwargs: dict[str, Any], owns: Owns, label: str) -> nn.Module:
    import inspect

    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise LowbitError(f"cannot call {label} with arguments {kwargs}: {exc}") from None
    except ValueError:  # no signature to check (a builtin): let the call tell
        pass
    try:
        model = factory(**kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 -- an exception in the user's factory is theirs to fix
        raise _user_error(exc, owns, f"error in {label}") from None
    if not isinstance(model, nn.Module):
        raise LowbitError(f"{label} returned a {type(model).__module__}.{type(model).__qualname__}, "
                          f"not a torch.nn.Module")
    return model


def build_user_model(source: str | ModelSource, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the model of a ``file.py:factory`` or ``package.module:factory`` source (no weights).

    Raises:
        LowbitError: for a missing file or module, an exception in the user's code (naming its file
            and line), a missing factory, or a factory returning something else than an ``nn.Module``.
    """
    source = source if isinstance(source, ModelSource) else ModelSource(source)
    kwargs = _check_kwargs(kwargs)
    if source.kind == "zoo":
        from .zoo import build_model

        return build_model(source.location, kwargs)
    if source.kind == "file":
        path = Path(source.location).expanduser()
        if not path.is_file():
            raise LowbitError(f"no model file {source.location}" + (" (it is a directory)" if path.is_dir() else ""))
        folder = str(path.resolve().parent)
        with _on_path(folder):
            module = _import_file(path)
            factory = _factory(module, source.attr, str(path))
            return _build(factory, kwargs, _owned_by({str(path.resolve())}), f"{path}:{source.attr}")
    module = _import_module(source.location)
    factory = _factory(module, source.attr, source.location)
    return _build(factory, kwargs, _module_owner(source.location), source.text)


def _check_kwargs(kwargs: Any) -> dict[str, Any]:
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise LowbitError(f"model arguments must be a mapping of names to values, got {kwargs!r}")
    return kwargs


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a safetensors file, or from ``torch.save`` read with ``weights_only=True``.

    A checkpoint dict (``{"state_dict": ..., "epoch": ...}``) gives the one state dict it holds
    under ``state_dict`` or ``model``; ``module.`` prefixes (DataParallel) are taken off when every
    name has one. Nothing else is unpickled.
    """
    import pickle

    import torch

    from .zoo import read_state_file

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"no weights file at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    with open(path, "rb") as f:
        head = f.read(16)
    # a safetensors file starts with its 8-byte little-endian header length, then '{'
    if path.suffix.lower() == ".safetensors" or head[8:9] == b"{":
        return read_state_file(path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowbitError(f"{path}: not a plain state dict (torch.load(weights_only=True) refused it: {first}); "
                          f"save model.state_dict(), or use safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise LowbitError(f"{path} is neither a safetensors file nor a torch.save state dict: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    return _state_dict_of(data, path)


def _state_dict_of(data: Any, path: Path) -> dict[str, Tensor]:
    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in d.items())

    if not is_state(data) and isinstance(data, dict):
        held = [k for k in ("state_dict", "model") if is_state(data.get(k))]
        if len(held) > 1:
            raise LowbitError(f"{path}: the checkpoint holds state dicts under both 'state_dict' and 'model'; "
                              f"save the one to use on its own")
        if held:
            metadata = getattr(data[held[0]], "_metadata", None)
            data = data[held[0]]
            if metadata is not None:
                data._metadata = metadata  # type: ignore[attr-defined]
    if not is_state(data):
        kind = (f"a dict with keys {sorted(map(str, data))[:6]}" if isinstance(data, dict)
                else f"a {type(data).__name__}")
        raise LowbitError(f"{path}: expected a state dict (names -> tensors), or a checkpoint holding one under "
                          f"'state_dict' or 'model', got {kind}")
    if all(k.startswith("module.") for k in data):
        metadata = getattr(data, "_metadata", None)
        data = type(data)((k[len("module."):], v) for k, v in data.items()) if isinstance(data, dict) else data
        if metadata is not None:
            data._metadata = {("" if k == "module" else k[len("module."):] if k.startswith("module.") else k): v
                              for k, v in metadata.items()}  # type: ignore[attr-defined]
    return data


def load_model(source: str | ModelSource, kwargs: dict[str, Any] | None = None,
               weights: str | os.PathLike | None = None) -> nn.Module:
    """The FP model of a source (see the module docstring), with ``weights`` loaded; in eval mode.

    Args:
        source: a zoo name, ``path/to/file.py:factory`` or ``package.module:factory``.
        kwargs: keyword arguments for the factory (zoo: the constructor; default: the checkpoint's
            record).
        weights: a safetensors file or a ``torch.save`` state dict. Zoo models without it load
            their shipped checkpoint; other models keep what the factory built.

    Raises:
        LowbitError: for every problem with the source, the user's code or the weights.
    """
    source = source if isinstance(source, ModelSource) else ModelSource(source)
    if source.is_zoo:
        from .zoo import load_pretrained

        try:
            return load_pretrained(source.location, weights=weights, model_kwargs=kwargs)
        except LowbitError as exc:
            if weights is None and "no trained checkpoint" in str(exc):
                raise LowbitError(f"{exc}; pass --weights FILE for your own weights") from None
            raise
    model = build_user_model(source, kwargs)
    if weights is not None:
        from .zoo import load_state

        state = read_weights(weights)
        load_state(model, state, str(weights))
    return model.eval()
