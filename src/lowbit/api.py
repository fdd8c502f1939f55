"""The public API: quantize, export, load, methods."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Literal

from torch import Tensor, nn

from .config import DEFAULT_BITS, build_config  # noqa: F401  (re-exported: lowbit.api.build_config)
from .config import check_device as _check_device
from .data.calib import read_calibration
from .deploy.multibit import is_multibit_model
from .errors import LowbitError
from .graph.surgery import input_ranks, prepare
from .layer_bits import LayerBits, check_layer_bits
from .options import check_value
from .ptq.registry import get_method
from .ptq.registry import methods as _methods
from .quant.layers import quant_layers
from .record import publish, record_of

logger = logging.getLogger(__name__)


def quantize(model: nn.Module, calib: Tensor | Iterable, w_bits: int = DEFAULT_BITS, a_bits: int | None = DEFAULT_BITS,
             method: str = "minmax", **options: Any) -> nn.Module:
    """Quantize ``model`` post-training and return a new module that simulates it.

    Args:
        model: any FP CNN (left unchanged).
        calib: normalized float inputs N x C x H x W, an ``(input, target)`` pair of tensors, a
            map-style ``Dataset``, or an iterable of batches (tensors, ``(input, target)`` tuples,
            or dicts with ``input_key``). Tensors and Datasets with more than ``calib_size``
            images are subsampled by ``seed``; other iterables give their first ``calib_size``
            images and are read no further (see ``lowbit.data.calib``).
        w_bits: weight bits of body layers (1..16).
        a_bits: activation bits of body-layer inputs (1..16), None for weights only.
        method: a name from ``lowbit.methods()``.
        **options: ``QuantConfig`` fields (granularity, groups, calib_size, device, ...),
            ``quantize_all=True`` (no 8-bit first/last layers, quantized input),
            ``layer_bits={pattern: bits | (w_bits, a_bits) | None | [w0, w1, ...]}`` (per-layer widths
            over glob patterns of layer names, later patterns win, None keeps a layer in float, a
            per-channel sequence or 1-D int tensor gives each output channel its weight width, 0
            pruning it, and forces per-channel scales for that layer; see ``lowbit.layer_bits``), ``config=``
            a QuantConfig, ``input_key=`` (the input's key in dict batches), and the method's own
            options. A method option named like a QuantConfig field wins (``batch_size`` of
            brecq/qdrop/distill: images per step); set the config's through ``config=``.

    Returns:
        The quantized simulation, in eval mode, on ``device``; its record (``lowbit.record_of``,
        read-only as the ``lowbit_info`` mapping) holds the method, config, options, folded BN
        pairs, the calibration ``input_shape``, every layer's resolved widths (``layer_bits``:
        name -> w_bits, a_bits, enabled) and the method's results.
    """
    start = time.perf_counter()
    spec = get_method(method)
    input_key = check_value(options.pop("input_key", None), str | None, "input_key", "lowbit")
    layer_bits = check_layer_bits(options.pop("layer_bits", None))
    cfg, method_options = build_config(w_bits, a_bits, options, spec.option_names, spec.config_defaults)
    opts = spec.make_options(method_options)
    x = read_calibration(calib, cfg.calib_size, cfg.seed, input_key, input_ranks(model))
    try:
        qmodel, _ = prepare(model, cfg, x[:2], layer_bits=layer_bits)
    except LowbitError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise LowbitError(f"calibration data of shape {tuple(x.shape[1:])} does not fit the model: {exc}") from None
    # every method draws from its own generators seeded with cfg.seed: torch's global RNG (the
    # caller's, on every device, shared by all threads) is neither read nor reseeded
    spec.handler(qmodel, x, cfg, opts)
    record = record_of(qmodel)
    _record_settled_widths(qmodel, record.layer_bits)
    record.arch = getattr(model, "lowbit_arch", None)  # the zoo's constructor arguments, on the FP model
    record.method, record.config = method, cfg
    record.options = asdict(opts) if is_dataclass(opts) else {}
    record.input_shape = [int(d) for d in x.shape[1:]]  # one calibration input, e.g. (C, H, W)
    publish(qmodel)
    layers = quant_layers(qmodel)
    logger.info("quantized %d of %d layers with %r (W%s A%s, %s scales, %d calibration images) in %.1f s",
                sum(l.weight_quant.enabled for _, l in layers), len(layers), method, cfg.w_bits, cfg.a_bits,
                cfg.granularity, len(x), time.perf_counter() - start)
    return qmodel.eval()


def _record_settled_widths(qmodel: nn.Module, layer_bits: dict[str, LayerBits]) -> None:
    """Record the weight widths the method left, where it changed them.

    A method that mixes widths inside a layer (``aciq-mix``) gives the layer its widest channel's
    width as its storage width; the record (and so the artifact's per-layer map) must say that width.
    """
    for name, layer in quant_layers(qmodel):
        entry = layer_bits.get(name)
        if entry is not None and entry.enabled and layer.weight_quant.enabled:
            layer_bits[name] = replace(entry, w_bits=int(layer.weight_quant.bits))


ONNX_SUFFIXES = (".onnx",)
ARTIFACT_SUFFIXES = (".lowbit", ".safetensors", "")  # "": a path without a suffix


def export_format(path: str | os.PathLike) -> str:
    """``"onnx"`` or ``"artifact"``: what ``export`` writes to ``path``, decided by its suffix (any case).

    ``.onnx`` is a QDQ ONNX graph; ``.lowbit``, ``.safetensors`` (the artifact is a safetensors
    file) or no suffix the packed artifact; any other suffix is a LowbitError, so that a typo or
    a format lowbit does not write (``.tflite``, ``.pt``) is never silently given an artifact.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise LowbitError(f"an export path must be a str or os.PathLike, got {type(path).__name__}")
    suffix = Path(path).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in ARTIFACT_SUFFIXES:
        return "artifact"
    raise LowbitError(f"cannot export to {os.fspath(path)!r}: unknown suffix {Path(path).suffix!r}; use .onnx for an "
                      f"ONNX QDQ graph, or .lowbit, .safetensors or no suffix for the packed artifact")


# the options of ONNX exports and their types (deploy.onnx_qdq.export_onnx's keyword arguments)
ONNX_OPTIONS: dict[str, Any] = {"opset": int | None, "input_shape": tuple[int, ...] | None, "int32_bias": bool,
                                "exporter": Literal["torch.export", "torchscript"]}


def export(qmodel: nn.Module, path: str | os.PathLike, **onnx_options: Any) -> Path:
    """Write the deployable artifact of a quantized model.

    A path ending in ``.onnx`` (any case) gives a QDQ ONNX graph (``onnx_options``: ``opset``,
    ``input_shape`` (default: the calibration input's shape), ``int32_bias``, ``exporter``); ``.lowbit``,
    ``.safetensors`` or no suffix the packed safetensors artifact; other suffixes are refused.
    """
    from .deploy.artifact import save_artifact

    kind = export_format(path)
    path = Path(path)
    if kind == "onnx" and is_multibit_model(qmodel):  # DMBQ: sign planes + alphas, not an integer grid
        return _export_multibit_onnx(qmodel, path, onnx_options)
    if kind == "onnx":
        from .deploy.onnx_qdq import export_onnx

        unknown = sorted(set(onnx_options) - set(ONNX_OPTIONS))
        if unknown:
            raise LowbitError(f"unknown ONNX export option(s) {unknown}; known: {', '.join(ONNX_OPTIONS)}")
        checked = {k: check_value(v, ONNX_OPTIONS[k], k, "lowbit.export") for k, v in onnx_options.items()}
        written = export_onnx(qmodel, path, **checked)
    else:
        if onnx_options:
            raise LowbitError(f"options {sorted(onnx_options)} apply to .onnx exports only")
        written = save_artifact(qmodel, path)
    logger.info("wrote %s (%s, %d bytes)", written, "ONNX QDQ graph" if kind == "onnx" else "packed artifact",
                Path(written).stat().st_size)
    return written


def _export_multibit_onnx(qmodel: nn.Module, path: Path, onnx_options: dict[str, Any]) -> Path:
    from .deploy.multibit import export_multibit_onnx

    unknown = sorted(set(onnx_options) - {"opset", "input_shape"})
    if unknown:
        raise LowbitError(f"option(s) {unknown} do not apply to the ONNX export of a multi-bit (DMBQ) model; "
                          f"known: opset, input_shape")
    checked = {k: check_value(v, ONNX_OPTIONS[k], k, "lowbit.export") for k, v in onnx_options.items()}
    return export_multibit_onnx(qmodel, path, **checked)


def integer_model(qmodel: nn.Module, bias_frac_bits: int = 0) -> nn.Module:
    """The integer-only reference of a quantized model (integer weights, codes and accumulation)."""
    from .deploy.integer import integer_model as build

    if is_multibit_model(qmodel):
        raise LowbitError("multi-bit (DMBQ) layers are not on an integer grid: there is no integer-only reference "
                          "for them (an integer device runs one binary accumulation per plane, see "
                          "lowbit.deploy.multibit); evaluate the model in PyTorch or export it to ONNX")
    return build(qmodel, bias_frac_bits)


def load(path: str | os.PathLike, model: nn.Module | None = None, device: str = "cpu") -> nn.Module:
    """Rebuild a quantized model from an artifact; ``model`` gives the architecture (zoo models may omit it).

    Every value in the file is checked first (see ``lowbit.deploy.load_artifact``); ONNX files are
    not artifacts: they run in ONNX Runtime (``lowbit.deploy.onnx_session``, ``lowbit eval --onnx``).
    """
    from .deploy.artifact import load_artifact

    if isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() in ONNX_SUFFIXES:
        raise LowbitError(f"{os.fspath(path)} is an ONNX file: run it with ONNX Runtime (lowbit.deploy.onnx_session, "
                          "or `lowbit eval --onnx FILE`); lowbit.load reads the packed .lowbit artifact")
    _check_device(device)
    qmodel = load_artifact(path, model, device)
    logger.debug("loaded %s (%s, %d layers) on %s", os.fspath(path), record_of(qmodel).method,
                 len(quant_layers(qmodel)), device)
    return qmodel


def methods() -> list[str]:
    """Names of the registered quantization methods."""
    return _methods()
