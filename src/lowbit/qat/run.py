"""``lowbit.qat``: quantization-aware fine-tuning of an FP model with a registered QAT method."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, is_dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..config import DEFAULT_BITS, build_config
from ..data.calib import (as_calibration_tensor, check_input, concat_batches, is_map_dataset, sample_calibration,
                          split_batch)
from ..errors import LowbitError
from ..graph.fold import find_conv_bn_pairs
from ..graph.surgery import input_ranks, prepare
from ..layer_bits import check_layer_bits, has_channel_bits
from ..options import check_value
from ..ptq.start import fp_teacher
from ..record import publish, record_of
from ..train.rng import private_global_rng
from .engine import CONFIG_RESUMABLE, QAT_FIELDS, QatConfig, check_checkpoint_target, fit, logger
from .registry import FinalizeContext, get_qat_method, qat_methods


def _as_labelled(data: Any, what: str, input_key: str | None = None, target_key: str | None = None,
                 ranks: tuple[int, ...] = (4,)) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from a pair of tensors, a map-style Dataset or an iterable of batches.

    Batches (and Dataset items) are ``(input, target, ...)`` tuples or lists, or dicts read with
    ``input_key`` and ``target_key``; labels are refused where images are expected.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        if input_key is not None:
            raise LowbitError(f"input_key={input_key!r} applies to dict batches, but {what} is a pair of tensors")
        x, y = data
    else:
        if isinstance(data, Mapping):
            items: Iterable = [data]  # one dict batch
        elif is_map_dataset(data):
            items = (data[i] for i in range(len(data)))
        else:
            try:
                items = iter(data)
            except TypeError:
                raise LowbitError(f"{what} must be (images, labels) tensors, a Dataset or an iterable of "
                                  f"(x, y) batches, got {type(data).__name__}") from None
        xs, ys = [], []
        for i, item in enumerate(items):
            where = f"{what} batch {i}"
            x, y = split_batch(item, where, input_key, target_key)
            if y is None:
                raise LowbitError(f"{where} has no labels: {what} batches must be (images, labels) pairs, or "
                                  f"dicts with input_key= and target_key=")
            xs.append(check_input(x, where, ranks=ranks))
            y = torch.as_tensor(y)
            ys.append(y.reshape(1) if y.dim() == 0 else y)  # a Dataset item's label is a scalar
        if not xs:
            raise LowbitError(f"{what} is empty")
        x = concat_batches(xs)
        if any(t.dim() != 1 for t in ys):
            raise LowbitError(f"{what}: labels must be a 1-D integer tensor with one label per image")
        y = torch.cat(ys)
    x = as_calibration_tensor(x, ranks=ranks)
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point():
        raise LowbitError(f"{what}: labels must be a 1-D integer tensor with one label per image")
    return x, y.long()


def qat(model: nn.Module, train_data: Tensor | Iterable, val_data: Any = None, method: str = "lsq",
        w_bits: int = DEFAULT_BITS, a_bits: int | None = DEFAULT_BITS, epochs: int | None = None,
        log: Callable[[str], Any] | None = None, **options: Any) -> nn.Module:
    """Quantization-aware fine-tuning of ``model``; returns a quantized model ``lowbit.export`` handles.

    Args:
        model: trained FP CNN (left unchanged).
        train_data: ``(images, labels)`` tensors, a map-style Dataset of ``(image, label)`` items,
            or an iterable of ``(x, y)`` batches (or of dicts: pass ``input_key`` and ``target_key``).
        val_data: same form, evaluated after every epoch (optional).
        method: a name from ``lowbit.qat_methods()`` ("lsq", "gdrq", "tsq", "dmbq").
        w_bits: weight bits of body layers (methods that allocate bits, ``dmbq`` with ``lba``,
            take a fractional average budget such as 1.5).
        a_bits: activation bits of body-layer inputs (None: weights only).
        epochs: training epochs (``QatConfig.epochs`` by default).
        log: where per-epoch lines go (default: the ``lowbit.qat.engine`` logger at INFO).
        **options: ``layer_bits`` (per-layer widths, as in ``lowbit.quantize``),
            ``QuantConfig`` fields (granularity, groups, seed, device, ...), ``QatConfig``
            fields (lr, batch_size, checkpoint, resume, overwrite, log_dir, ...), ``input_key`` and
            ``target_key`` (the keys of dict batches) and the method's options. A name shared
            by several goes to the method's options first (gdrq's ``momentum``), then to
            ``QatConfig`` (``batch_size``); ``QuantConfig``'s field is then set through ``config=``.

    Raises:
        LowbitError: among others, when ``checkpoint`` exists and neither ``resume`` nor ``overwrite``
            is given, or when it is resumed with settings other than those it was written with
            (each difference is named; ``QAT_RESUMABLE`` and ``CONFIG_RESUMABLE`` list what may
            change), or is damaged.

    The caller's global random state (CPU, and the GPU trained on) is the same afterwards.
    """
    spec = get_qat_method(method)
    keys = {k: check_value(options.pop(k, None), str | None, k, "lowbit") for k in ("input_key", "target_key")}
    # a method's own option wins over a training field of the same name (gdrq's momentum);
    # paths may be os.PathLike, the config stores strings (it goes into JSON run records)
    train_opts = {k: os.fspath(v) if isinstance(v, os.PathLike) else v
                  for k, v in ((k, options.pop(k)) for k in list(options)
                               if k in QAT_FIELDS and k not in spec.option_names)}
    if epochs is not None:
        train_opts["epochs"] = epochs
    tcfg = QatConfig(**train_opts)
    check_checkpoint_target(tcfg)  # before the (possibly long) setup
    if spec.fractional_bits and isinstance(w_bits, float) and not isinstance(w_bits, bool) and math.isfinite(w_bits):
        # a bit budget (DMBQ + LBA): the layers start at its ceiling, the method holds the average
        options.setdefault("w_budget", w_bits)
        w_bits = max(1, math.ceil(w_bits))
    layer_bits = check_layer_bits(options.pop("layer_bits", None))
    if has_channel_bits(layer_bits) and not spec.channel_bits:  # GDRQ, TSQ, DMBQ: one code range per layer
        honour = ", ".join(repr(n) for n in qat_methods() if get_qat_method(n).channel_bits)
        raise LowbitError(f"QAT method {method!r} cannot honour per-channel weight widths in layer_bits (its "
                          f"trained quantizers have one code range per layer); use method {honour} or "
                          f"lowbit.quantize (PTQ) for per-channel widths and pruned channels, or per-layer widths here")
    cfg, method_options = build_config(w_bits, a_bits, options, spec.option_names)
    opts = spec.make_options(method_options)
    if not spec.fold_bn:
        cfg = cfg.with_(fold_bn=False)
    ranks = input_ranks(model)
    x_train, y_train = _as_labelled(train_data, "train_data", **keys, ranks=ranks)
    val = _as_labelled(val_data, "val_data", **keys, ranks=ranks) if val_data is not None else None
    calib = sample_calibration(x_train, min(cfg.calib_size, len(x_train)), cfg.seed)
    qmodel, graph = prepare(model, cfg, calib[:2], layer_bits=layer_bits)
    record = record_of(qmodel)
    if not spec.fold_bn:
        record.bn_pairs = [tuple(p) for p in find_conv_bn_pairs(model, scale_mergeable=True)]
    with private_global_rng(cfg.seed, cfg.device):  # seeded setup; the caller's RNG state is left alone
        spec.setup(qmodel, calib, cfg, opts)
    # What a checkpoint must match beyond the training settings (fit adds those): the method, the
    # quantization config less CONFIG_RESUMABLE, and the method's options, each under the name the
    # user passes it by (batch_size is a field of both configs: the calibration one is
    # "config.batch_size" here), so that a refused resume names the option that differs.
    run: dict[str, Any] = {"method": method}
    for key, value in cfg.to_dict().items():
        if key not in CONFIG_RESUMABLE:
            run[f"config.{key}" if key in QAT_FIELDS else key] = value
    for key, value in (asdict(opts) if is_dataclass(opts) else {}).items():
        run[f"option.{key}" if key in run or key in QAT_FIELDS else key] = value
    run["layer_bits"] = graph["layer_bits"]  # a checkpoint resumes only with the same per-layer widths
    teacher = fp_teacher(model) if tcfg.kd_weight > 0 else None  # fit runs it under no_grad
    log = logger.info if log is None else log  # finalize (TSQ's layer-wise step) logs through it too
    summary = fit(qmodel, x_train, y_train, val, tcfg, run, cfg.seed, torch.device(cfg.device),
                  progress=cfg.progress, log=log, teacher=teacher)
    record.qat = summary
    if not summary["finished"]:
        return qmodel  # stopped by max_steps: still training-time quantizers, resume to finish (not published)
    extra = ()
    if spec.wants_context:  # methods that keep working after training (TSQ's layer-wise step)
        extra = (FinalizeContext(calib, x_train, y_train, val, tcfg, cfg.seed, torch.device(cfg.device),
                                 cfg.progress, log, teacher),)
    final_cfg = spec.finalize(qmodel, cfg, opts, *extra) or cfg
    if not spec.fold_bn:  # finalize folded the pairs BN trained in
        record.fold_pairs, record.bn_pairs = record.bn_pairs, []
    record.arch, record.method, record.config = getattr(model, "lowbit_arch", None), method, final_cfg
    record.options = asdict(opts) if is_dataclass(opts) else {}
    record.input_shape = list(calib.shape[1:])
    publish(qmodel)
    return qmodel.eval()
