"""Export of mixed-width models: artifact reload, ONNX Runtime parity and latency (issue #15, section 4).

For every zoo model (those registered without a trained checkpoint, ResNet-18 and ShuffleNetV2,
trained here for ``--untrained-steps`` Adam steps) and a small non-zoo CNN (trained here too),
quantize with a mixed ``layer_bits`` map holding 1, 2, 3, 4 and 8-bit layers, FP layers (None) and
per-channel widths (4/8/2/3 cycling) with pruned (0-bit) channels, the lowest-norm eighth of each
such layer's channels. Then:

* ``.lowbit``: export, ``lowbit.load`` and compare predictions with the simulation;
* ``.onnx`` (``lowbit.export``'s graph: per-channel widths in the layer's widest container, pruned
  channels removed where exact): ONNX Runtime top-1 and per-image agreement with the simulation;
* the alternative ONNX form of per-channel widths, each layer split into one Conv per container
  width (INT2 / INT4 / INT8) joined by Concat and a Gather that restores the channel order, and
  the widest-container graph with every pruned channel kept as zero codes: agreement of each, and
  batch-1 ONNX Runtime latency (1 intra-op thread; median over interleaved rounds, so the three
  graphs see the same machine load) of all three, side by side.

    python benchmarks/mixed_export.py [--models resnet20 mobilenetv2 resnet18 shufflenetv2]
        [--eval-size 2000] [--repeats 100] [--rounds 5] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lowbit
from lowbit.deploy.onnx_qdq import (as_unsigned_weight, build_onnx, collect_specs, container_bits, int_initializer,
                                    onnx_predict, onnx_session, saturates_u8s8, weight_type)
from lowbit.evaluate import predict
from lowbit.models.registry import create_model
from lowbit.models.zoo import pretrained_path
from lowbit.quant.layer_specs import layer_specs

from common import add_data_args, load_data, parse_args, table, write_section

ZOO = ("resnet20", "mobilenetv2", "resnet18", "shufflenetv2")
PER_CHANNEL = (4, 8, 2, 3)  # widths of the per-channel layers' channels, cycled
# what the middle layers get, spread evenly over them, the rest at --w-bits ("pc": per-channel
# widths with pruned channels; None: FP)
SPREAD = ("pc", 3, "pc", 1, 8, None, 2)


class PlainCNN(nn.Module):
    """A non-zoo CNN: conv-BN-ReLU chains (3x3 padded and 1x1 unpadded), strided convs, a linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        def block(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*block(1, 16, 3), *block(16, 32, 3, 2), *block(32, 32, 1), *block(32, 48, 3, 2),
                                      *block(48, 48, 1), *block(48, 64, 3), *block(64, 64, 1), *block(64, 64, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def train_briefly(model: nn.Module, steps: int) -> nn.Module:
    """``model`` after ``steps`` Adam steps of batch 64 on the Fashion-MNIST training split (in eval mode).

    For the networks with no trained checkpoint (the non-zoo CNN, zoo architectures registered but
    not trained): enough training that the logits have margins, so ONNX Runtime agreement measures
    the export rather than ties between near-equal classes of a random network. Seed the global
    generator before building ``model``: its batches come from it too.
    """
    from lowbit.data import load_fashion_mnist

    x, y = load_fashion_mnist("train")
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    perm = torch.randperm(len(x))
    model.train()
    for i in range(steps):
        idx = perm[(i * 64) % len(x):(i * 64) % len(x) + 64]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_plain(steps: int, seed: int = 0) -> nn.Module:
    """PlainCNN after ``steps`` Adam steps of batch 64 on the Fashion-MNIST training split."""
    torch.manual_seed(seed)
    return train_briefly(PlainCNN(), steps)


def mixed_map(model: nn.Module) -> dict[str, object]:
    """First layer 8 bit, last layer FP, SPREAD over the middle layers (evenly spaced), the rest unnamed
    (``w_bits``); per-channel layers prune their lowest-norm eighth of output channels (at least one)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    bits: dict[str, object] = {names[0]: 8, names[-1]: None}
    middle = names[1:-1]
    if len(middle) < len(SPREAD):
        raise SystemExit(f"mixed_export: a model needs {len(SPREAD) + 2} conv/linear layers, not {len(names)}")
    for i, choice in enumerate(SPREAD):
        name = middle[round(i * (len(middle) - 1) / (len(SPREAD) - 1))]
        weight = model.get_submodule(name).weight.detach()
        if choice == "pc":
            widths = [PER_CHANNEL[c % len(PER_CHANNEL)] for c in range(weight.shape[0])]
            for c in weight.flatten(1).norm(dim=1).argsort()[:max(1, weight.shape[0] // 8)].tolist():
                widths[c] = 0
            choice = widths
        bits[name] = choice
    return bits


def split_by_width(model: onnx.ModelProto, qmodel: nn.Module) -> tuple[onnx.ModelProto, int]:
    """The alternative form: every Conv with per-channel widths of several containers becomes one Conv
    per container (pruned channels go with the narrowest), joined by Concat (+ Gather when the channel
    order changes). Grouped convs stay whole. Returns the graph and how many layers were split."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    weights, inputs = collect_specs(qmodel)
    widths = {}
    for spec in layer_specs(qmodel):
        w = spec.weight
        if w is not None and w.group_bits is not None and w.axis == 0:
            widths[spec.name] = np.repeat(w.group_bits, w.channels // w.num_groups)
    producer = {o: n for n in graph.node for o in n.output}
    new_nodes, split = [], 0
    for node in graph.node:
        source = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if source is not None and source.op_type == "Reshape":
            source = producer.get(source.input[0])
        name = source.input[0][:-len(".weight_q")] if source is not None and source.input[0].endswith(".weight_q") \
            else None
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if name not in widths or group != 1:
            new_nodes.append(node)
            continue
        w = widths[name]
        containers = sorted({container_bits(b) for b in w if b})
        if len(containers) == 1:
            new_nodes.append(node)
            continue
        spec = weights[name]
        codes = spec.codes.reshape(spec.codes.shape[:4]) if spec.codes.ndim > 4 else spec.codes
        parts, order = [], []
        for width in containers:
            idx = [c for c, b in enumerate(w) if (container_bits(b) if b else containers[0]) == width]
            order += idx
            dtype, _ = weight_type(width, spec.signed)
            part = type(spec)(codes[idx], spec.scale[idx], spec.zero_point[idx], width, spec.signed, dtype, 0)
            if saturates_u8s8(part, inputs.get(name)):
                part = as_unsigned_weight(part)
            tag = f"{name}.split{width}"
            stored = part.codes[..., None] if dtype in (TensorProto.INT2, TensorProto.UINT2) else part.codes
            graph.initializer.extend([int_initializer(f"{tag}.weight_q", stored, part.dtype),
                                      numpy_helper.from_array(part.scale, f"{tag}.weight_scale"),
                                      int_initializer(f"{tag}.weight_zero_point", part.zero_point, part.dtype)])
            dq = f"{tag}.weight_dq"
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}.weight_q", f"{tag}.weight_scale",
                                                                   f"{tag}.weight_zero_point"],
                                              [dq + ("_unshaped" if stored.ndim > 4 else "")], axis=0))
            if stored.ndim > 4:  # the exporter's guard against ORT's 2-bit QLinearConv fusion
                graph.initializer.append(numpy_helper.from_array(np.array(codes[idx].shape, np.int64),
                                                                 f"{tag}.weight_shape"))
                new_nodes.append(helper.make_node("Reshape", [dq + "_unshaped", f"{tag}.weight_shape"], [dq]))
            inputs_ = [node.input[0], dq]
            if len(node.input) > 2 and node.input[2]:
                bias = numpy_helper.to_array(next(t for t in graph.initializer if t.name == node.input[2]))
                graph.initializer.append(numpy_helper.from_array(bias[idx], f"{tag}.bias"))
                inputs_.append(f"{tag}.bias")
            conv = helper.make_node("Conv", inputs_, [f"{tag}.out"], name=f"{tag}.conv")
            conv.attribute.extend(node.attribute)
            new_nodes.append(conv)
            parts.append(f"{tag}.out")
        joined = node.output[0] if order == sorted(order) else f"{name}.split_concat"
        new_nodes.append(helper.make_node("Concat", parts, [joined], axis=1))
        if joined != node.output[0]:
            graph.initializer.append(numpy_helper.from_array(np.argsort(order).astype(np.int64), f"{name}.split_perm"))
            new_nodes.append(helper.make_node("Gather", [joined, f"{name}.split_perm"], [node.output[0]], axis=1))
        split += 1
    outputs = {o.name for o in graph.output}
    while True:  # the replaced convs' weight DequantizeLinear (and Reshape) nodes are now dead
        used = {i for n in new_nodes for i in n.input} | outputs
        live = [n for n in new_nodes if any(o in used for o in n.output)]
        if len(live) == len(new_nodes):
            break
        new_nodes = live
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(model, full_check=True)
    return model, split


def latency(sessions: dict[str, object], image: np.ndarray, repeats: int, rounds: int) -> dict[str, float]:
    """Median batch-1 milliseconds per session, the sessions interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, sess in sessions.items():
            name = sess.get_inputs()[0].name
            for _ in range(repeats):
                start = time.perf_counter()
                sess.run(None, {name: image})
                times[key].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * (a.argmax(1) == b.argmax(1)).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap)
    ap.set_defaults(models=[*ZOO, "plaincnn"], calib_size=256, eval_size=2000)
    ap.add_argument("--w-bits", type=int, default=4, help="width of layers the map does not name")
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--plain-steps", type=int, default=300, help="training steps of the non-zoo CNN")
    ap.add_argument("--untrained-steps", type=int, default=150,
                    help="training steps of a zoo architecture with no checkpoint (0: skip such models)")
    ap.add_argument("--repeats", type=int, default=100, help="batch-1 runs per graph per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = parse_args(ap)
    calib, x, y = load_data(args)
    rows, lat_rows, notes, zoo_used = [], [], [], []
    start_all = time.perf_counter()
    for name in args.models:
        start = time.perf_counter()
        if name == "plaincnn":
            fp = train_plain(args.plain_steps)
        elif not pretrained_path(name).exists():
            if not args.untrained_steps:
                notes.append(f"`{name}` skipped: no checkpoint at `{pretrained_path(name).name}` (registered in "
                             "the zoo but not trained)")
                print(notes[-1], flush=True)
                continue
            torch.manual_seed(0)
            fp = train_briefly(create_model(name), args.untrained_steps)
            notes.append(f"`{name}`: no zoo checkpoint (registered, not trained); the architecture with "
                         f"its default arguments trained here for {args.untrained_steps} Adam steps of batch 64, "
                         "so its top-1 is not the zoo's: the row measures export parity")
        else:
            fp = lowbit.load_pretrained(name)
            zoo_used.append(name)
        bits = mixed_map(fp)
        q = lowbit.quantize(fp, calib, w_bits=args.w_bits, a_bits=args.a_bits, method=args.method,
                            layer_bits=bits, progress=False)
        sim = predict(q, x)
        with tempfile.TemporaryDirectory() as tmp:
            art = lowbit.export(q, Path(tmp) / "m.lowbit")
            back = lowbit.load(art, model=None if name != "plaincnn" else PlainCNN())
            reload = predict(back, x)
            onnx_path = lowbit.export(q, Path(tmp) / "m.onnx")
            onnx_bytes = onnx_path.stat().st_size
            default = onnx.load(str(onnx_path))
        kept = build_onnx(q, drop_pruned=False)
        split, n_split = split_by_width(kept, q)
        graphs = {"widest, pruned dropped (export)": default, "widest, pruned kept": kept,
                  "split per width": split}
        sessions = {k: onnx_session(g.SerializeToString()) for k, g in graphs.items()}
        logits = {k: onnx_predict(s, x) for k, s in sessions.items()}
        ort = logits["widest, pruned dropped (export)"]
        meta = json.loads(next(p.value for p in default.metadata_props if p.key == "lowbit"))["layers"]
        pruned = [m["weight"]["pruned_channels"] for m in meta.values() if "pruned_channels" in m.get("weight", {})]
        removed = sum(p["removed"] for p in pruned)
        folded = sum(p["folded"] for p in pruned)
        total = sum(p["pruned"] for p in pruned)
        reasons = sorted({p["kept"] for p in pruned if "kept" in p})
        layers = [v for v in bits.values()]
        kinds = sorted({str(v) for v in layers if not isinstance(v, list)} | {str(args.w_bits)},
                       key=lambda s: (s == "None", int(s) if s != "None" else 0))
        ms = latency(sessions, x[:1].numpy(), args.repeats, args.rounds)
        base = ms["widest, pruned kept"]
        rows.append([f"`{name}`", f"{', '.join(kinds)}; {sum(isinstance(v, list) for v in layers)} per-channel",
                     top1(predict(fp, x), y), top1(sim, y), top1(reload, y), "yes" if torch.equal(reload.argmax(1), sim.argmax(1)) else "no",
                     top1(ort, y), agree(ort, sim), agree(logits["split per width"], sim),
                     agree(logits["widest, pruned kept"], sim), f"{removed}/{total} ({folded} folded)",
                     f"{onnx_bytes / 1024:.1f}", f"{time.perf_counter() - start:.0f}"])
        lat_rows.append([f"`{name}`", n_split] + [f"{ms[k]:.3f} ({ms[k] / base:.2f}x)" for k in graphs]
                        + [f"{g.ByteSize() / 1024:.1f}" for g in graphs.values()])
        if reasons:
            notes.append(f"`{name}`: pruned channels kept as zero codes where " + "; ".join(reasons))
        print(rows[-1], lat_rows[-1], flush=True)
    body = (
        "## Mixed-width export: artifact reload, ONNX Runtime parity and latency (issue #15)\n\n"
        f"Fashion-MNIST, {len(x)} test images, {len(calib)} calibration images, `{args.method}`, "
        f"A{args.a_bits}, unnamed layers W{args.w_bits}. Map (`mixed_map`): first layer 8 bit, last layer "
        "FP (None), seven middle layers spread evenly at per-channel, 3, per-channel, 1, 8, FP, 2 bits, the "
        f"others at {args.w_bits}; a per-channel layer's channels cycle 4/8/2/3 bits and its lowest-norm eighth is "
        "pruned (0 bits). `plaincnn`: a non-zoo conv/BN/ReLU CNN (3x3 padded and 1x1 unpadded convs) "
        f"trained here for {args.plain_steps} Adam steps. The map is a parity test, not an accuracy target "
        "(a 1-bit and a 2-bit layer can cost a small network most of its accuracy). Top-1 in %; `reload =` "
        "says whether the "
        "reloaded `.lowbit` predicts the same class as the simulation on every image; agreement = % "
        "of images where ONNX Runtime's class equals the simulation's. ONNX is `lowbit.export`'s graph "
        "(per-channel widths in the widest container, pruned channels removed where exact: "
        "removed/pruned, folded = removed with their constant folded into the next conv's bias).\n\n"
        + table(["model", "layer widths", "FP top-1", "sim top-1", ".lowbit top-1", "reload =", "ORT top-1",
                 "agree %", "agree % (split)", "agree % (kept)", "pruned removed", "ONNX KiB", "s"], rows)
        + "\n\n### ONNX Runtime latency of the three forms of per-channel widths\n\n"
        f"Batch 1, 1 intra-op thread, median of {args.rounds} interleaved rounds x {args.repeats} runs; "
        "ratio to the widest container with pruned channels kept (the exporter's form before pruned "
        "channels are removed). `split layers`: Convs split into one per container width (grouped convs "
        "stay whole). KiB: serialized graph size of each form.\n\n"
        + table(["model", "split layers", "ms: widest, pruned dropped (export)", "ms: widest, pruned kept",
                 "ms: split per width", "KiB: export", "KiB: kept", "KiB: split"], lat_rows)
        + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
        + f"\n\nTotal wall time {time.perf_counter() - start_all:.0f} s.")
    print(body, flush=True)
    if not args.no_write:
        write_section("mixed-export", body, zoo_used)


if __name__ == "__main__":
    main()
