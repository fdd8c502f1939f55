"""The record of a quantized model: what was done to it, in one typed place.

``graph.surgery.prepare`` attaches a :class:`QuantRecord` to the quantization-ready copy; the
method running on that copy writes its results there (BRECQ's per-block losses, LAPQ's report,
GDRQ's clipping factors, ...), ``lowbit.quantize`` / ``lowbit.qat`` / ``lowbit.load`` fill in
the rest and :func:`publish` it. ``record_of(qmodel)`` is the accessor.

Where it lives: one plain attribute, ``lowbit_record``, on the root module. Not a registry keyed
by the model: a plain attribute sits in the module's ``__dict__``, so ``copy.deepcopy`` copies it
with the model (a registry entry would be lost on the copy and kept alive for the original), it
is pickled with ``torch.save(qmodel)``, and ``.to(device)`` / ``state_dict()`` leave it alone,
which is right because the record holds no tensors. A model read from an artifact gets a record
built from the file's manifest (``deploy.artifact``).

``qmodel.lowbit_info`` stays as the read-only compatibility view of the record
(:class:`InfoView`): a mapping with the keys the dictionary of earlier versions had, built from
the record on every access, so it never disagrees with it. It is attached by :func:`publish`
once the model is complete (a QAT run stopped by ``max_steps`` has a record but no
``lowbit_info``: exporters refuse it, as before).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import QuantConfig
from .errors import LowbitError
from .layer_bits import LayerBits
from .layer_bits import record as layer_bits_record
from .quant.spec import LayerSpec

RECORD_ATTR = "lowbit_record"
INFO_ATTR = "lowbit_info"


@dataclass
class QuantRecord:
    """Everything lowbit knows about a quantized model beyond its tensors.

    Attributes:
        config: the quantization config that describes the model (after a QAT method's
            finalize: the one a device sees, e.g. BN folded, per-channel steps).
        layer_order: quantized layers in execution order (empty when unknown, old artifacts).
        layer_bits: every layer's resolved widths (``lowbit.layer_bits``), by layer name.
        declared: every layer's declared spec (``quant.declare``), by layer name: the code books
            ``graph.surgery.prepare`` built the quantizers from, before calibration; a QAT method's
            setup re-declares the parts it trains (multibit, sparse, a settled input sign) and builds
            its trainable quantizers from them (``quant.layer_specs.layer_specs`` reads what the
            model holds now). Empty for a model read from an artifact (its stored specs are calibrated).
        fold_pairs: ``(conv, bn)`` pairs whose BN is folded into the conv.
        equalized_pairs: ``(conv, conv)`` pairs whose scales were equalized.
        arch: the zoo architecture (``{"name", "kwargs"}``) when known.
        method: the PTQ or QAT method's name (None until the method has run).
        options: the method's options, as a JSON-able dict.
        input_shape: one calibration input's shape without the batch dimension.
        bn_pairs: ``(conv, bn)`` pairs a QAT method that trains with BN (``fold_bn=False``) keeps
            live and folds at finalize; they become ``fold_pairs`` then.
        qat: the QAT run's summary (``qat.engine.fit``: finished, steps, total_steps, history,
            config), None for PTQ.
        reconstruction: per-block (or per-stage) losses of ``brecq``, ``qdrop`` and ``distill``.
        lapq: LAPQ's report (p sweep, chosen p, start and final loss, evaluations, seconds).
        gdrq_k: GDRQ's Scale-Clip factor per ``<layer>.weight`` / ``<layer>.input`` ("max": off).
        lba_moves: bit moves DMBQ's loss-guided bit allocation made.
        tsq: TSQ's report (step-2 records, zero shares, fine-tune history).
        extra: results of methods registered outside lowbit, by a name of their choosing.
        method_state: a QAT method's working state between its setup and its finalize (TSQ's
            layer list); finalize clears it. Never exported. (DMBQ's LBA allocator is a child
            module instead, ``lowbit_lba``: its buffers belong in the training checkpoints.)
    """

    config: QuantConfig
    layer_order: list[str] = field(default_factory=list)
    layer_bits: dict[str, LayerBits] = field(default_factory=dict)
    declared: dict[str, LayerSpec] = field(default_factory=dict)
    fold_pairs: list[tuple[str, str]] = field(default_factory=list)
    equalized_pairs: list[tuple[str, str]] = field(default_factory=list)
    arch: dict[str, Any] | None = None
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    input_shape: list[int] | None = None
    bn_pairs: list[tuple[str, str]] = field(default_factory=list)
    qat: dict[str, Any] | None = None
    reconstruction: list[dict[str, Any]] | None = None
    lapq: dict[str, Any] | None = None
    gdrq_k: dict[str, float | str] | None = None
    lba_moves: int | None = None
    tsq: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    method_state: Any = None

    def declaration(self, name: str) -> LayerSpec:
        """The declared spec of layer ``name`` (LowbitError when the model was not prepared with one)."""
        spec = self.declared.get(name)
        if spec is None:
            raise LowbitError(f"layer {name!r} has no declared spec: a QAT method trains a model from "
                              "graph.surgery.prepare (lowbit.qat), not one read from a file")
        return spec

    def info(self) -> dict[str, Any]:
        """The dictionary ``lowbit_info`` used to be (JSON-able; ``qat`` only after QAT)."""
        out: dict[str, Any] = {
            "arch": self.arch, "method": self.method, "config": self.config.to_dict(), "options": dict(self.options),
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "fold_pairs": [list(p) for p in self.fold_pairs], "equalized_pairs": [list(p) for p in self.equalized_pairs],
            "layer_order": list(self.layer_order),
            "layer_bits": layer_bits_record(self.layer_bits) if self.layer_bits else None,
        }
        if self.qat is not None:
            out["qat"] = self.qat
        return copy.deepcopy(out)  # a caller changing the dictionary must not change the record


class InfoView(Mapping[str, Any]):
    """``qmodel.lowbit_info``: a read-only mapping over the model's :class:`QuantRecord`.

    Each lookup is answered from the record as it is now (values are fresh copies: changing
    them changes nothing); write to ``lowbit.record_of(qmodel)`` instead.
    """

    def __init__(self, record: QuantRecord) -> None:
        self._record = record

    def __getitem__(self, key: str) -> Any:
        return self._record.info()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._record.info())

    def __len__(self) -> int:
        return len(self._record.info())

    def __repr__(self) -> str:
        return f"InfoView({self._record.info()!r})"


def attach(qmodel: nn.Module, record: QuantRecord) -> QuantRecord:
    """Give ``qmodel`` its record (replacing any earlier one, and its ``lowbit_info`` view)."""
    if not isinstance(record, QuantRecord):
        raise TypeError(f"a QuantRecord is needed, got {type(record).__name__}")
    qmodel.__dict__.pop(INFO_ATTR, None)  # a view of the old record would disagree with the new one
    setattr(qmodel, RECORD_ATTR, record)
    return record


def publish(qmodel: nn.Module) -> QuantRecord:
    """Mark the model complete: attach ``lowbit_info``, the compatibility view of its record."""
    record = record_of(qmodel)
    setattr(qmodel, INFO_ATTR, InfoView(record))
    return record


def record_of(qmodel: Any) -> QuantRecord:
    """The :class:`QuantRecord` of a model quantized (or being quantized) by lowbit.

    Raises:
        LowbitError: when ``qmodel`` carries no record (it was never quantized by lowbit).
    """
    record = getattr(qmodel, RECORD_ATTR, None) if isinstance(qmodel, nn.Module) else None
    if not isinstance(record, QuantRecord):
        raise LowbitError("this model carries no lowbit record: it was not returned by lowbit.quantize, "
                          "lowbit.qat or lowbit.load")
    return record
