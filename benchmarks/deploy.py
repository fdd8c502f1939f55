"""Deployment benchmark: file sizes, ONNX Runtime accuracy and parity, integer path, CPU latency.

For each model (trained Fashion-MNIST checkpoints) and bit configuration (minmax PTQ, standard
protocol): sizes of the FP32 state dict, the packed .lowbit artifact (and its theoretical size),
the FP32 and QDQ .onnx files; top-1 of the PyTorch simulation, of ONNX Runtime on the exported
graph and of the integer-only reference path, with per-image argmax agreement; ONNX Runtime
latency (batch 1) and throughput (batch 256) of the FP32 graph and the QDQ graph, measured side
by side (interleaved) in one run. Writes the "deploy" section of benchmarks/RESULTS.md.

    python benchmarks/deploy.py [--models resnet20 mobilenetv2] [--configs W8A8 W4A4 W2A4]
                                [--eval-size N] [--integer-size N] [--threads 1] [--random]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit.deploy.integer import integer_agreement, integer_model, with_int32_bias
from lowbit.deploy.onnx_qdq import export_float_onnx, export_onnx, onnx_predict, onnx_session
from lowbit.deploy.size import MB, quantized_bytes
from lowbit.evaluate import predict

from common import add_data_args, load_data, table, write_section, parse_args

CONFIGS = {"W8A8": (8, 8), "W4A4": (4, 4), "W2A4": (2, 4), "W4A8": (4, 8), "W3A3": (3, 3)}


def file_mb(path: Path) -> float:
    return path.stat().st_size / MB


def fp32_state_dict_mb(model: torch.nn.Module, folder: Path) -> float:
    from safetensors.torch import save_file

    path = folder / "fp32.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return file_mb(path)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def time_sessions(graphs: dict[str, tuple[Path, bool]], images: torch.Tensor, threads: int, batch: int,
                  repeats: int, rounds: int) -> dict[str, float]:
    """Median seconds per batch of each (ONNX file, fold weights) graph, timed in interleaved rounds."""
    sessions = {k: onnx_session(p, threads, fold_weights=fold) for k, (p, fold) in graphs.items()}
    feed = images[:batch].numpy()
    for s in sessions.values():  # warm-up: allocation, kernel selection
        s.run(None, {"input": feed})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, s in sessions.items():
            start = time.perf_counter()
            for _ in range(repeats):
                s.run(None, {"input": feed})
            times[key].append((time.perf_counter() - start) / repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, args: argparse.Namespace, calib: torch.Tensor, x_test: torch.Tensor,
                y_test: torch.Tensor, folder: Path) -> tuple[str, list[list], list[list], list[list]]:
    if args.random:
        torch.manual_seed(0)
        fp = lowbit.create_model(name).eval()
    else:
        fp = lowbit.load_pretrained(name)
    fp_logits = predict(fp, x_test)
    fp_acc = top1(fp_logits, y_test)
    fp_onnx = export_float_onnx(fp, folder / f"{name}_fp32.onnx")
    fp_ort_acc = top1(onnx_predict(fp_onnx, x_test), y_test)
    sizes = [[name, "FP32", fp32_state_dict_mb(fp, folder), "-", "-", "-", file_mb(fp_onnx)]]
    accs, speed_rows = [], []
    graphs = {"FP32": (fp_onnx, False)}
    x_int, y_int = x_test[:args.integer_size], y_test[:args.integer_size]
    for config in args.configs:
        w_bits, a_bits = CONFIGS[config]
        q = lowbit.quantize(fp, calib, w_bits=w_bits, a_bits=a_bits, method="minmax")
        artifact = lowbit.export(q, folder / f"{name}_{config}.lowbit")
        onnx_path = lowbit.export(q, folder / f"{name}_{config}.onnx")
        graphs[f"{config} QDQ"] = (onnx_path, False)
        graphs[f"{config} QDQ, weights folded at load"] = (onnx_path, True)
        theoretical = quantized_bytes(q)
        over = f"{100.0 * (artifact.stat().st_size / theoretical - 1):+.1f}%"
        sizes.append([name, config, "-", theoretical / MB, file_mb(artifact), over, file_mb(onnx_path)])
        sim = predict(q, x_test)
        ort = onnx_predict(onnx_path, x_test)
        agree = 100.0 * (sim.argmax(1) == ort.argmax(1)).float().mean().item()
        device = integer_model(q)
        dev = integer_agreement(q, x_int, device, labels=y_int)
        dev_rounded = integer_agreement(with_int32_bias(q), x_int, device)
        dev16 = integer_agreement(q, x_int, integer_model(q, bias_frac_bits=16), labels=y_int)
        accs.append([name, config, top1(sim, y_test), top1(ort, y_test), top1(ort, y_test) - top1(sim, y_test),
                     agree, (sim - ort).abs().max().item(), dev["sim_top1"], dev["integer_top1"],
                     dev["argmax_agreement"], dev_rounded["argmax_agreement"], dev16["argmax_agreement"],
                     "yes" if dev["fits_int32"] else "no"])
        print(f"{name} {config}: sim {accs[-1][2]:.2f} ort {accs[-1][3]:.2f} agree {agree:.2f}% | integer "
              f"{dev['integer_top1']:.2f} (agree {dev['argmax_agreement']:.2f}%, int32-bias sim "
              f"{dev_rounded['argmax_agreement']:.2f}%, 16 frac bits {dev16['argmax_agreement']:.2f}%)", flush=True)
        if config == "W8A8":  # the int32-bias graph: what ONNX Runtime's integer kernels can run
            int32_path = export_onnx(q, folder / f"{name}_{config}_int32bias.onnx", int32_bias=True)
            graphs[f"{config} QDQ, int32 bias"] = (int32_path, False)
            sim32 = predict(with_int32_bias(q), x_test)
            ort32 = onnx_predict(int32_path, x_test)
            accs.append([name, f"{config} int32 bias", top1(sim32, y_test), top1(ort32, y_test),
                         top1(ort32, y_test) - top1(sim32, y_test),
                         100.0 * (sim32.argmax(1) == ort32.argmax(1)).float().mean().item(),
                         (sim32 - ort32).abs().max().item()] + ["-"] * 6)
    lat = time_sessions(graphs, x_test, args.threads, 1, args.repeats, args.rounds)
    thr = time_sessions(graphs, x_test, args.threads, 256, 1, args.rounds)
    big = min(256, len(x_test))
    for key in graphs:
        speed_rows.append([name, key, 1000.0 * lat[key], big / thr[key], lat["FP32"] / lat[key],
                           thr["FP32"] / thr[key]])
        print(f"{name} {key}: batch-1 {1000 * lat[key]:.3f} ms, batch-{big} {big / thr[key]:.0f} img/s", flush=True)
    head = f"{name}: FP32 top-1 {fp_acc:.2f}% (PyTorch), {fp_ort_acc:.2f}% (ONNX Runtime)"
    return head, sizes, accs, speed_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap)
    ap.add_argument("--configs", nargs="+", default=["W8A8", "W4A4", "W2A4"], choices=sorted(CONFIGS))
    ap.add_argument("--integer-size", type=int, default=2000, help="test images for the integer path (slow)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--repeats", type=int, default=50, help="batch-1 runs per timing round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    ap.add_argument("--random", action="store_true", help="random-weight models (development only; never written)")
    args = parse_args(ap)
    torch.set_num_threads(args.threads)
    calib, x_test, y_test = load_data(args)
    heads, sizes, accs, speeds = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            head, s, a, v = bench_model(name, args, calib, x_test, y_test, Path(tmp))
            heads.append(head)
            sizes += s
            accs += a
            speeds += v
    body = "\n\n".join([
        "## Deployment: packed artifacts, ONNX QDQ in ONNX Runtime, integer-only path, CPU latency",
        (f"minmax PTQ, {args.calib_size} calibration images, standard protocol (first conv and last FC at 8 bit, "
         f"network input unquantized), BN folded. Accuracy on {len(x_test)} Fashion-MNIST test images; "
         f"integer path on the first {min(args.integer_size, len(x_test))}. "
         + "; ".join(heads) + "."),
        "### File sizes (MB)",
        ("`theoretical` = weights at their bit width + scales/zero points + everything else at 32 bit "
         "(the seed 002 \"Size (MB)\" column); `.lowbit` = the packed safetensors artifact (`vs theoretical`: its "
         "header and manifest); `.onnx` = the QDQ "
         "graph (INT4/INT2 initializers packed two/four per byte, per-channel float scales, graph structure)."),
        table(["model", "config", "FP32 state dict", "theoretical", ".lowbit", "vs theoretical", ".onnx"], sizes),
        "### ONNX Runtime and integer path versus the PyTorch simulation (top-1 %)",
        ("`ORT agree` = % of test images whose ONNX Runtime argmax equals the simulation's. The integer path "
         "uses int32 biases at s_x*s_w and fixed-point requantization; `agree (int32-bias sim)` compares it "
         "with the simulation whose biases are rounded the same way, `agree (16 frac bits)` with 16 extra "
         "fractional bias bits against the plain simulation. The `int32 bias` row is the graph exported with "
         "`int32_bias=True`, compared with the int32-bias simulation."),
        table(["model", "config", "sim", "ORT", "ORT - sim", "ORT agree %", "max |logit diff|", "sim (int subset)",
               "integer", "integer agree %", "agree (int32-bias sim) %", "agree (16 frac bits) %",
               "acc fits int32"], accs),
        f"### ONNX Runtime CPU latency ({args.threads} intra-op thread{'s' if args.threads > 1 else ''})",
        ("Median of interleaved rounds; FP32 = the float model exported by torch.onnx (BN fused by the "
         "exporter); `speedup` > 1 means faster than FP32. `QDQ` = default session: ONNX Runtime 1.32 keeps "
         "weight DequantizeLinear nodes out of constant folding (for its QDQ fusions) and has no int4/int2 "
         "convolution kernels, so it dequantizes every weight on every run and cannot pre-pack them. "
         "`weights folded at load` = the same file with the session option `session.disable_quant_qdq=1`: "
         "weights are dequantized once when the session loads, activations still pass their Q/DQ (results "
         "unchanged). `int32 bias` = W8A8 exported with `int32_bias=True`, which ONNX Runtime runs with "
         "QLinearConv integer kernels where a layer's output feeds a quantizer directly."),
        table(["model", "graph", "batch-1 ms", "batch-256 img/s", "speedup b1", "speedup b256"], speeds),
    ])
    if args.random:
        body = "(random weights: development run, not written)\n\n" + body
    elif not args.no_write:
        write_section("deploy", body, args.models)
    print(body)


if __name__ == "__main__":
    torch.manual_seed(0)
    np.random.seed(0)
    main()
