"""``lowbit.summary``: per-layer bit widths, parameters and bytes of a quantized model, with totals.

Bytes come from ``deploy.size`` (the same counting as the artifact's size and the "Size (MB)"
reports): weights at their bit width plus their scales, float32 for layers left in float. Widths
and bytes are read from the layers' declared specs (``quant.layer_specs``), never from the
quantizer modules, so a model mid-QAT (training stand-ins, no spec yet) is a LowbitError.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .deploy.artifact import require_quantized
from .deploy.size import MB, layer_weight_bytes, own_weight_elements, quantized_bytes
from .quant import spec as qspec
from .quant.layer_specs import layer_specs
from .quant.layers import float_weight_layers
from .quant.spec import TensorSpec

FLOAT_BITS = 32  # a layer left in float counts as 32-bit weights in the averages


@dataclass(frozen=True)
class LayerSummary:
    """One weight layer: ``w_bits`` None = float weights, ``a_bits`` None = float input.

    Layers whose channels have their own widths (``aciq-mix``, per-channel ``layer_bits``) show
    ``w_bits``, their storage width (the widest channel's); the artifact packs each channel at its
    own width, pruned channels none, which ``weight_bytes`` counts; ``w_bits_mean`` is their true
    mean width, which the totals' averages use.
    """

    name: str
    kind: str
    role: str
    w_bits: int | float | None  # float: the mean over channels of mixed widths (DMBQ + LBA)
    a_bits: int | None
    params: int  # weight elements
    weight_bytes: int  # at their width plus scales (float32 when w_bits is None)
    w_bits_mean: float | None = None  # mean over the weights when channels have their own widths (aciq-mix)

    @property
    def avg_w_bits(self) -> float | None:
        """The true average weight width (``w_bits`` unless channels have their own widths)."""
        return self.w_bits_mean if self.w_bits_mean is not None else self.w_bits


@dataclass(frozen=True)
class Summary:
    """The per-layer table (``layers``) and the totals of a quantized model.

    Totals: ``avg_w_bits`` (parameter-weighted over every weight layer, float ones at 32),
    ``avg_w_bits_quantized`` (over quantized layers only), ``avg_a_bits`` (mean over the layers
    whose input is quantized, None when none is), ``weight_bytes`` (sum of the layers'),
    ``model_bytes`` (all stored tensor data, as ``deploy.size.quantized_bytes``), ``params``,
    ``fp_layers`` (weight layers left in float), ``pruned_channels`` (output channels at 0 bits).
    """

    layers: list[LayerSummary]
    totals: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.layers], "totals": dict(self.totals)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        """The table and the totals as GitHub markdown."""
        def bits(b: int | float | None) -> str:
            return "fp" if b is None else f"{b:.3f}" if isinstance(b, float) else str(b)

        lines = ["| layer | kind | role | W bits | A bits | params | weight bytes |",
                 "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r.name} | {r.kind} | {r.role} | {bits(r.w_bits)}"
                  f"{'' if r.w_bits_mean is None else f' (mean {r.w_bits_mean:.3g})'} | {bits(r.a_bits)} | "
                  f"{r.params} | {r.weight_bytes} |" for r in self.layers]
        t = self.totals
        avg_a = "fp" if t["avg_a_bits"] is None else f"{t['avg_a_bits']:.3f}"
        avg_q = "-" if t["avg_w_bits_quantized"] is None else f"{t['avg_w_bits_quantized']:.3f}"
        lines += ["", f"avg W bits {t['avg_w_bits']:.3f} (float layers at 32; quantized layers only: {avg_q}), "
                  f"avg A bits {avg_a}, weight bytes {t['weight_bytes']} ({t['weight_bytes'] / MB:.4f} MB), "
                  f"model {t['model_bytes'] / MB:.4f} MB, {t['params']} weight params, "
                  f"{t['fp_layers']} float layer(s), {t['pruned_channels']} pruned channel(s)"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def summary(qmodel: nn.Module) -> Summary:
    """Per-layer widths, parameters and bytes of a model from ``lowbit.quantize`` / ``qat`` / ``load``."""
    require_quantized(qmodel)
    specs = layer_specs(qmodel)
    rows: list[LayerSummary] = []
    pruned = 0
    for s in specs:
        ws, ins = s.weight, s.input
        mixed = ws is not None and ws.kind == "uniform" and ws.group_bits is not None  # per-channel widths: w_bits is the widest
        rows.append(LayerSummary(s.name, s.kind, s.role, None if ws is None else _w_bits(ws),
                                 None if ins is None else ins.bits, math.prod(s.weight_shape), layer_weight_bytes(s),
                                 ws.mean_bits if mixed else None))
        pruned += 0 if ws is None else qspec.pruned_channels(ws)  # DMBQ + LBA: 0-bit channels
    for name, module in float_weight_layers(qmodel):  # kinds lowbit does not quantize: float32
        params = own_weight_elements(module)
        rows.append(LayerSummary(name, type(module).__name__, "float", None, None, params, params * 4))
    return Summary(rows, _totals(rows, quantized_bytes(qmodel, specs), pruned))


def _w_bits(spec: TensorSpec) -> int | float:
    """A layer's weight bits: its width, or the mean of its channels' bases when a multi-bit layer's differ
    (uniform per-group widths show the widest, their storage width in ONNX and the layer's w_bits)."""
    return spec.mean_bits if spec.kind == "multibit" and len(set(spec.widths)) > 1 else spec.bits


def _totals(rows: list[LayerSummary], model_bytes: int, pruned: int = 0) -> dict[str, Any]:
    params = sum(r.params for r in rows)
    quantized = [r for r in rows if r.w_bits is not None]
    q_params = sum(r.params for r in quantized)
    a_bits = [r.a_bits for r in rows if r.a_bits is not None]
    return {
        # a float layer (None) counts at 32 bits; a fully pruned layer (0 bits) at 0, not as float
        "avg_w_bits": sum(r.params * (FLOAT_BITS if r.avg_w_bits is None else r.avg_w_bits) for r in rows) / params
        if params else 0.0,
        "avg_w_bits_quantized": sum(r.params * r.avg_w_bits for r in quantized) / q_params if q_params else None,
        "avg_a_bits": sum(a_bits) / len(a_bits) if a_bits else None,
        "weight_bytes": sum(r.weight_bytes for r in rows),
        "model_bytes": model_bytes,
        "params": params,
        "fp_layers": sum(r.w_bits is None for r in rows),
        "pruned_channels": pruned,
    }
