"""``lowbit.qat``: quantization-aware fine-tuning of an FP model with a registered QAT method."""
from __future__ import annotations

import copy
from dataclasses import asdict, is_dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..api import DEFAULT_BITS, build_config
from ..data.calib import as_calibration_tensor, sample_calibration
from ..errors import LowbitError
from ..graph.fold import find_conv_bn_pairs
from ..graph.surgery import input_ranks, prepare
from ..train import private_global_rng
from .engine import CONFIG_RESUMABLE, QAT_FIELDS, QatConfig, check_checkpoint_target, fit
from .registry import get_qat_method


def _as_labelled(data: Any, what: str, ranks: tuple[int, ...] = (4,)) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from a pair of tensors or an iterable of ``(x, y)`` batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    else:
        try:
            batches = list(data)
        except TypeError:
            raise LowbitError(f"{what} must be (images, labels) tensors or an iterable of (x, y) batches") from None
        if not batches or not all(isinstance(b, (tuple, list)) and len(b) >= 2 for b in batches):
            raise LowbitError(f"{what} batches must be (images, labels) pairs")
        x = torch.cat([torch.as_tensor(b[0]) for b in batches])
        y = torch.cat([torch.as_tensor(b[1]) for b in batches])
    x = as_calibration_tensor(x, ranks=ranks)
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point():
        raise LowbitError(f"{what}: labels must be a 1-D integer tensor with one label per image")
    return x, y.long()


def qat(model: nn.Module, train_data: Tensor | Iterable, val_data: Any = None, method: str = "lsq",
        w_bits: int = DEFAULT_BITS, a_bits: int | None = DEFAULT_BITS, epochs: int | None = None,
        log=print, **options: Any) -> nn.Module:
    """Quantization-aware fine-tuning of ``model``; returns a quantized model ``lowbit.export`` handles.

    Args:
        model: trained FP CNN (left unchanged).
        train_data: ``(images, labels)`` tensors, or an iterable of ``(x, y)`` batches.
        val_data: same form, evaluated after every epoch (optional).
        method: a name from ``lowbit.qat_methods()`` ("lsq", "gdrq").
        w_bits: weight bits of body layers.
        a_bits: activation bits of body-layer inputs (None: weights only).
        epochs: training epochs (``QatConfig.epochs`` by default).
        log: where per-epoch lines go.
        **options: ``QuantConfig`` fields (granularity, groups, seed, device, ...), ``QatConfig``
            fields (lr, batch_size, checkpoint, resume, overwrite, log_dir, ...) and the method's options.

    Raises:
        LowbitError: among others, when ``checkpoint`` exists and neither ``resume`` nor ``overwrite``
            is given, or when it is resumed with settings other than those it was written with
            (each difference is named; ``QAT_RESUMABLE`` and ``CONFIG_RESUMABLE`` list what may
            change), or is damaged.

    The caller's global random state (CPU, and the GPU trained on) is the same afterwards.
    """
    spec = get_qat_method(method)
    train_opts = {k: options.pop(k) for k in list(options) if k in QAT_FIELDS}
    if epochs is not None:
        train_opts["epochs"] = epochs
    tcfg = QatConfig(**train_opts)
    check_checkpoint_target(tcfg)  # before the (possibly long) setup
    cfg, method_options = build_config(w_bits, a_bits, options)
    opts = spec.make_options(method_options)
    if not spec.fold_bn:
        cfg = cfg.with_(fold_bn=False)
    ranks = input_ranks(model)
    x_train, y_train = _as_labelled(train_data, "train_data", ranks)
    val = _as_labelled(val_data, "val_data", ranks) if val_data is not None else None
    calib = sample_calibration(x_train, min(cfg.calib_size, len(x_train)), cfg.seed)
    qmodel, record = prepare(model, cfg, calib[:2])
    if not spec.fold_bn:
        qmodel.lowbit_bn_pairs = find_conv_bn_pairs(model, scale_mergeable=True)
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
    teacher = copy.deepcopy(model).eval() if tcfg.kd_weight > 0 else None  # fit runs it under no_grad
    summary = fit(qmodel, x_train, y_train, val, tcfg, run, cfg.seed, torch.device(cfg.device),
                  progress=cfg.progress, log=log, teacher=teacher)
    if not summary["finished"]:
        qmodel.lowbit_qat = summary
        return qmodel  # stopped by max_steps: still training-time quantizers, resume to finish
    final_cfg = spec.finalize(qmodel, cfg, opts) or cfg
    if not spec.fold_bn:
        record["fold_pairs"] = [list(p) for p in getattr(qmodel, "lowbit_bn_pairs", [])]
    qmodel.lowbit_info = {
        "arch": getattr(model, "lowbit_arch", None), "method": method, "config": final_cfg.to_dict(),
        "options": asdict(opts) if is_dataclass(opts) else {}, **record,
        "input_shape": list(calib.shape[1:]), "qat": summary,
    }
    return qmodel.eval()
