"""Per-layer sensitivity to quantization: what quantizing one layer alone at each bit width costs.

For every quantizable layer (``quant.layers.quant_layers`` after ``graph.surgery.prepare``) and
every width ``b``, only that layer's weights (and / or its input) are quantized at ``b`` bits while
every other layer stays in float, and the cost is measured against the FP model's outputs, which
are computed once and cached:

- ``"kl"``: mean KL divergence ``KL(p_fp || p_q)`` of the softmax outputs over the calibration
  images (a task-loss proxy that needs no labels), with the top-1 agreement to the FP model.
- ``"taylor"``: the first-order score of LBA (Zhao et al., CVPR 2021). With ``g`` the gradient
  of the mean KL loss w.r.t. the quantized tensor at the quantized point (accumulated over all
  calibration batches; weights: ``x = W``; activations: ``x`` = the layer's input), the score
  is ``|(x - x_hat)^T g(x_hat)|``: since the KL is 0 at ``x``, it is the first-order estimate
  of the KL that quantizing the tensor adds, in the same units as "kl" and additive over layers,
  which is what ranking and the knapsack of ``lowbit.allocate_bits`` need. LBA's per-element
  form ``|(x - x_hat)^T g(x_hat)| / n`` (``n`` the tensor's elements, per image for inputs) is
  in ``extra["taylor_per_element"]``: it compares units per stored element, and favours small
  layers when used to rank whole layers (a 40-weight classifier outranks a 576-weight conv
  whose KL is 30 times larger: tests/test_sensitivity.py; on ResNet-20 its rank correlation
  with the KL is 0.57-0.91, the total's 0.99-1.0). Each (layer, width) costs one
  forward and one backward pass that stops at the quantized tensor; the KL of that forward
  pass comes for free and is reported too.

A Hessian-trace score (HAWQ) is not offered: see the README section "Sensitivity and bit
allocation" for why.

The unit of measurement is a layer; ``SensitivityReport`` keys its scores by unit name. Per channel
(``per_channel=True``, weights, metric "taylor"), the same passes also give every output channel's
share of the first-order score, ``|(w_c - w_hat_c)^T g_c|`` (the terms of one channel's weights),
in ``extra["channel_scores"]`` under units named ``"layer[c]"``, plus a pruning score at 0 bits,
``|w_c^T g_c|`` with ``g`` taken at the narrowest width measured (the first-order cost of setting
the channel to 0 near the low-bit point; no extra pass). ``lowbit.allocate_bits(granularity=
"channel")`` allocates from them.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import build_config
from .data.calib import read_calibration
from .errors import LowbitError
from .graph.surgery import input_ranks, prepare
from .options import check_value
from .progress import progress_bar
from .ptq.common import fresh_batch
from .quant.layers import quant_layers
from .quant.ranges import RANGE_ESTIMATORS
from .quant.uniform import check_bits
from .record import record_of

TARGETS = ("weights", "activations", "both")
METRICS = ("kl", "taylor")
RANGES = ("mse", "minmax")

Target = Literal["weights", "activations", "both"]
Metric = Literal["kl", "taylor"]


@dataclass
class SensitivityReport:
    """Sensitivity of every layer at every bit width.

    Attributes:
        metric: the metric of ``scores`` ("kl" or "taylor"); larger is more sensitive.
        target: what was quantized: "weights", "activations" or "both".
        bits: the widths measured.
        scores: unit name -> bits -> score of ``metric``.
        params: unit name -> weight elements (the budget weight of allocation).
        out_channels: unit name -> output channels (one float32 scale each, for sizes).
        input_elements: unit name -> input elements per image (the activation budget weight).
        order: unit names in execution order (the first and last layer by protocol).
        extra: other measurements, unit -> bits -> value: "top1_agreement" (fraction of
            images whose top-1 class matches the FP model), and with metric taylor "kl" and
            "taylor_per_element" (LBA's score divided by the tensor's elements).
        skipped: unit name -> why it has no scores (e.g. the first layer's input is not
            quantized by default, so it has no activation sensitivity).
        seconds: wall time of the measurement.
        granularity: "layer", or "channel" when ``extra["channel_scores"]`` holds per-channel units
            ``"layer[c]"`` (``sensitivity(per_channel=True)``).
    """

    metric: str
    target: str
    bits: tuple[int, ...]
    scores: dict[str, dict[int, float]]
    params: dict[str, int]
    out_channels: dict[str, int]
    input_elements: dict[str, int]
    order: list[str]
    extra: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    granularity: str = "layer"
    images: int = 0

    def ranking(self, bits: int | None = None) -> list[str]:
        """Unit names, most sensitive first, at ``bits`` (default: the lowest width measured)."""
        b = min(self.bits) if bits is None else bits
        if b not in self.bits:
            raise LowbitError(f"bits={b} was not measured (measured: {list(self.bits)})")
        return sorted(self.scores, key=lambda n: (-self.scores[n][b], self.order.index(n)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (bit widths become string keys, as JSON requires)."""
        def table(t: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
            return {n: {str(b): v for b, v in row.items()} for n, row in t.items()}

        return {"metric": self.metric, "target": self.target, "granularity": self.granularity,
                "bits": list(self.bits), "images": self.images, "seconds": self.seconds, "order": self.order,
                "params": self.params, "out_channels": self.out_channels, "input_elements": self.input_elements,
                "scores": table(self.scores), "extra": {k: table(v) for k, v in self.extra.items()},
                "skipped": self.skipped}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SensitivityReport":
        """The report ``to_dict`` / ``to_json`` wrote."""
        def table(t: dict[str, dict[str, float]]) -> dict[str, dict[int, float]]:
            return {n: {int(b): float(v) for b, v in row.items()} for n, row in t.items()}

        try:
            return cls(metric=data["metric"], target=data["target"], bits=tuple(int(b) for b in data["bits"]),
                       scores=table(data["scores"]), params={k: int(v) for k, v in data["params"].items()},
                       out_channels={k: int(v) for k, v in data["out_channels"].items()},
                       input_elements={k: int(v) for k, v in data.get("input_elements", {}).items()},
                       order=list(data["order"]), extra={k: table(v) for k, v in data.get("extra", {}).items()},
                       skipped=dict(data.get("skipped", {})), seconds=float(data.get("seconds", 0.0)),
                       granularity=data.get("granularity", "layer"), images=int(data.get("images", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LowbitError(f"not a sensitivity report: {exc!r}") from None

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_markdown(self, path: str | Path | None = None) -> str:
        """A markdown table, one row per layer (execution order), one column per width."""
        head = [f"Sensitivity ({self.metric}, {self.target}, {self.images} images, {self.seconds:.1f} s); "
                f"larger = more sensitive", ""]
        cols = ["layer", "params"] + [f"{b} bit" for b in self.bits]
        agree = self.extra.get("top1_agreement")
        if agree:
            cols.append(f"top-1 agree @{min(self.bits)} bit")
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for name in self.order:
            if name not in self.scores:
                continue
            row = [f"`{name}`", str(self.params[name])] + [f"{self.scores[name][b]:.4g}" for b in self.bits]
            if agree:
                row.append(f"{agree[name][min(self.bits)]:.3f}")
            lines.append("| " + " | ".join(row) + " |")
        if self.skipped:
            lines += ["", "Not measured: " + "; ".join(f"`{n}` ({why})" for n, why in self.skipped.items())]
        text = "\n".join(head + lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def save_png(self, path: str | Path) -> Path:
        """Heat map layers x bits of log10 scores (matplotlib's object API: no global state)."""
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = [n for n in self.order if n in self.scores]
        data = np.array([[self.scores[n][b] for b in self.bits] for n in names], dtype=float).reshape(
            len(names), len(self.bits))
        positive = data[data > 0]
        floor = positive.min() if positive.size else 1.0
        shown = np.log10(np.maximum(data, floor))
        fig = Figure(figsize=(2.0 + 0.9 * len(self.bits), 1.2 + 0.28 * max(len(names), 1)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(self.bits)), [str(b) for b in self.bits])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("bits")
        ax.set_title(f"{self.metric} sensitivity ({self.target})", fontsize=9)
        fig.colorbar(im, ax=ax, label=f"log10 {self.metric}")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png", dpi=100)
        return path


class _Probe(nn.Module):
    """Stands in for a quantizer: applies it, cuts the graph there, and accumulates the LBA score.

    The quantized tensor ``x_hat`` becomes a leaf, so a backward pass stops at it; its gradient
    hook adds ``(x - x_hat)^T g(x_hat)`` to ``acc`` (signed: the absolute value is taken at the
    end, over all calibration batches, as the score of the whole data set).
    """

    def __init__(self, quantizer: nn.Module, track: bool, axis: int | None = None) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.track = track
        self.acc = 0.0
        self.axis = axis  # per-channel sums along this axis too (weights): acc_c, and zero_c for x_hat = 0
        self.acc_c: Tensor | None = None
        self.zero_c: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        x_hat = self.quantizer(x)
        if not (self.track and torch.is_grad_enabled()):
            return x_hat
        leaf = x_hat.detach().requires_grad_(True)
        delta = (x.detach() - leaf.detach()).double()

        x_fp = x.detach().double() if self.axis is not None else None

        def hook(g: Tensor) -> None:
            terms = delta * g.double()
            self.acc += float(terms.sum())
            if self.axis is not None:
                per = terms.movedim(self.axis, 0).flatten(1).sum(1).cpu()
                zero = (x_fp * g.double()).movedim(self.axis, 0).flatten(1).sum(1).cpu()
                self.acc_c = per if self.acc_c is None else self.acc_c + per
                self.zero_c = zero if self.zero_c is None else self.zero_c + zero

        leaf.register_hook(hook)
        return leaf


def _kl_rows(log_fp: Tensor, logits: Tensor) -> Tensor:
    """Per-image ``KL(p_fp || softmax(logits))``."""
    log_q = F.log_softmax(logits.float().flatten(1), dim=1)
    return (log_fp.exp() * (log_fp - log_q)).sum(1)


def _range_fn(name: str, what: str):
    check_value(name, Literal["mse", "minmax"], what, "lowbit.sensitivity")
    return RANGE_ESTIMATORS[name]


def sensitivity(model: nn.Module, calib: Tensor | Iterable, bits: Iterable[int] = (2, 3, 4, 8),
                target: Target = "weights", metric: Metric = "kl", w_range: str = "mse", a_range: str = "mse",
                progress: bool | None = None, per_channel: bool = False,
                **quantize_options: Any) -> SensitivityReport:
    """Measure, per layer and width, the cost of quantizing that layer alone.

    Args:
        model: an FP CNN (left unchanged).
        calib: calibration inputs, as for ``lowbit.quantize``.
        bits: the widths to measure (1..16).
        target: quantize the layer's "weights", its input ("activations"), or "both" at the width.
        metric: "kl" (KL to the FP outputs) or "taylor" (LBA's first-order score).
        w_range: weight clipping range per layer: "mse" (Lp=2 search) or "minmax".
        a_range: activation clipping range: "mse" (Lp=2.4 search, as the mse method) or "minmax".
        progress: progress bar (default: the config's ``progress``).
        per_channel: also score every output channel (``extra["channel_scores"]``, units
            ``"layer[c]"``, widths measured and 0); needs target "weights" and metric "taylor".
        **quantize_options: QuantConfig fields as in ``lowbit.quantize`` (granularity, groups,
            calib_size, batch_size, seed, device, fold_bn, equalize, quantize_input,
            w_symmetric, ...) and ``input_key``. ``first_last_bits`` does not apply: every
            layer is measured (allocation fixes the first and last layer).

    Returns:
        A ``SensitivityReport``; with metric "taylor" its ``extra["kl"]`` holds the KL as well.
    """
    start = time.perf_counter()
    target = check_value(target, Literal["weights", "activations", "both"], "target", "lowbit.sensitivity")
    metric = check_value(metric, Literal["kl", "taylor"], "metric", "lowbit.sensitivity")
    w_fn, a_fn = _range_fn(w_range, "w_range"), _range_fn(a_range, "a_range")
    widths = _check_widths(bits)
    per_channel = check_value(per_channel, bool, "per_channel", "lowbit.sensitivity")
    if per_channel and (target != "weights" or metric != "taylor"):
        raise LowbitError("per_channel=True scores weight channels by the Taylor score: it needs target='weights' "
                          f"and metric='taylor' (got target={target!r}, metric={metric!r})")
    options = dict(quantize_options)
    input_key = check_value(options.pop("input_key", None), str | None, "input_key", "lowbit.sensitivity")
    options.pop("first_last_bits", None)
    cfg, rest = build_config(max(widths), 8, {**options, "first_last_bits": None})
    if rest:
        raise LowbitError(f"unknown option(s) for lowbit.sensitivity: {', '.join(sorted(rest))}")
    show = cfg.progress if progress is None else check_value(progress, bool, "progress", "lowbit.sensitivity")
    x = read_calibration(calib, cfg.calib_size, cfg.seed, input_key, input_ranks(model))
    try:
        qmodel, record = prepare(model, cfg, x[:2])
    except LowbitError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise LowbitError(f"calibration data of shape {tuple(x.shape[1:])} does not fit the model: {exc}") from None
    qmodel.requires_grad_(False)  # gradients flow only to the probed tensor
    layers = dict(quant_layers(qmodel))
    order = [n for n in record["layer_order"] if n in layers]
    for layer in layers.values():
        layer.weight_quant.enabled = False
        layer.input_quant.enabled = False
    batches = [slice(i, i + cfg.batch_size) for i in range(0, len(x), cfg.batch_size)]

    # one FP pass, cached: the reference log-probabilities, and the inputs each layer sees (for
    # the activation ranges and the per-image input size)
    inputs_seen: dict[str, list[Tensor]] = {n: [] for n in order}
    in_elems: dict[str, int] = {}
    want_acts = target != "weights"

    def observe(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            t = args[0]
            in_elems[name] = int(t[0].numel())
            if want_acts:
                inputs_seen[name].append(_sample(t, cfg.seed + len(inputs_seen[name])))
        return hook

    handles = [layers[n].register_forward_pre_hook(observe(n)) for n in order]
    log_fp: list[Tensor] = []
    try:
        with torch.no_grad():
            for sl in batches:
                log_fp.append(F.log_softmax(qmodel(fresh_batch(x, cfg.device, sl)).float().flatten(1), dim=1))
    finally:
        for h in handles:
            h.remove()
    top_fp = [lp.argmax(1) for lp in log_fp]

    skipped: dict[str, str] = {}
    units = list(order)
    # the first layer's input is declared float unless quantize_input (graph.surgery.declare)
    if want_acts and order and record_of(qmodel).declared[order[0]].input is None:
        skipped[order[0]] = "the network input is not quantized (quantize_input=False)"
        if target == "activations":
            units = units[1:]
    scores: dict[str, dict[int, float]] = {}
    kl_table: dict[str, dict[int, float]] = {}
    agree_table: dict[str, dict[int, float]] = {}
    lba_table: dict[str, dict[int, float]] = {}
    channel_table: dict[str, dict[int, float]] = {}
    steps = [(n, b) for n in units for b in widths]
    for name, b in progress_bar(steps, desc=f"sensitivity ({metric})", enable=show):
        layer = layers[name]
        quant_w = target in ("weights", "both")
        quant_a = target in ("activations", "both") and name not in skipped
        wq, aq = layer.weight_quant, layer.input_quant
        if quant_w:
            wq.bits = b
            wq.calibrate(layer.weight, w_fn)
            wq.enabled = True
        if quant_a:
            aq.bits = b
            values = torch.cat(inputs_seen[name])
            aq.calibrate(values, a_fn, **({"p": 2.4} if a_range == "mse" else {}))
            aq.enabled = True
        probes: list[_Probe] = []
        if metric == "taylor":
            if quant_w:
                layer.weight_quant = _Probe(wq, True, wq.axis if per_channel else None)
                probes.append(layer.weight_quant)
            if quant_a:
                layer.input_quant = _Probe(aq, True)
                probes.append(layer.input_quant)
        try:
            kl_sum, agree = 0.0, 0
            for sl, lp, top in zip(batches, log_fp, top_fp):
                with torch.set_grad_enabled(metric == "taylor"):
                    out = qmodel(fresh_batch(x, cfg.device, sl))
                    rows = _kl_rows(lp, out)
                    if metric == "taylor":
                        # d(mean KL over all images)/d x_hat, accumulated batch by batch
                        (rows.sum() / len(x)).backward()
                kl_sum += float(rows.detach().sum())
                agree += int((out.detach().flatten(1).argmax(1) == top).sum())
        finally:
            layer.weight_quant, layer.input_quant = wq, aq
            wq.enabled = aq.enabled = False
        kl_table.setdefault(name, {})[b] = kl_sum / len(x)
        agree_table.setdefault(name, {})[b] = agree / len(x)
        if metric == "taylor":
            total = per_element = 0.0
            for p in probes:
                n = layer.weight.numel() if p.quantizer is wq else in_elems[name]
                total += abs(p.acc)
                per_element += abs(p.acc) / n
            scores.setdefault(name, {})[b] = total
            lba_table.setdefault(name, {})[b] = per_element
            if per_channel:
                probe = probes[0]
                for c in range(len(probe.acc_c)):
                    row = channel_table.setdefault(f"{name}[{c}]", {})
                    row[b] = abs(float(probe.acc_c[c]))
                    if b == widths[0]:  # pruning, scored at the narrowest width's point
                        row[0] = abs(float(probe.zero_c[c]))
    if metric == "kl":
        scores = kl_table
        extra = {"top1_agreement": agree_table}
    else:
        extra = {"kl": kl_table, "top1_agreement": agree_table, "taylor_per_element": lba_table}
        if per_channel:
            extra["channel_scores"] = {u: dict(sorted(row.items())) for u, row in channel_table.items()}
    params = {n: int(layers[n].weight.numel()) for n in order}
    out_ch = {n: int(layers[n].weight_quant.channels) for n in order}
    return SensitivityReport(metric=metric, target=target, bits=widths, scores=scores, params=params,
                             out_channels=out_ch, input_elements={n: in_elems.get(n, 0) for n in order},
                             order=order, extra=extra, skipped=skipped, seconds=time.perf_counter() - start,
                             images=len(x), granularity="channel" if per_channel else "layer")


def _sample(t: Tensor, seed: int, limit: int = 65536) -> Tensor:
    """A bounded random sample (a CPU copy) of a layer input, with its exact extremes."""
    flat = t.detach().reshape(-1).float()
    if flat.numel() > limit:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, flat.numel(), (limit,), generator=gen).to(flat.device)
        flat = torch.cat([flat[idx], flat.min().reshape(1), flat.max().reshape(1)])
    return flat.to("cpu", copy=True)


def _check_widths(bits: Iterable[int]) -> tuple[int, ...]:
    try:
        widths = tuple(sorted(set(bits)))
    except TypeError:
        raise LowbitError(f"bits must be a sequence of bit widths, got {bits!r}") from None
    if not widths:
        raise LowbitError("bits must name at least one width")
    for b in widths:
        if isinstance(b, bool) or not isinstance(b, int):
            raise LowbitError(f"bit widths must be integers, got {b!r}")
        check_bits(b, "bits")
    return widths


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman rank correlation of two scores over their common keys (ties get average ranks)."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return math.nan

    def ranks(v: dict[str, float]) -> list[float]:
        order = sorted(keys, key=lambda k: v[k])
        r = {}
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in order[i:j + 1]:
                r[k] = (i + j) / 2
            i = j + 1
        return [r[k] for k in keys]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((p - ma) * (q - mb) for p, q in zip(ra, rb))
    var = math.sqrt(sum((p - ma) ** 2 for p in ra) * sum((q - mb) ** 2 for q in rb))
    return cov / var if var else math.nan
