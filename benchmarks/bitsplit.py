"""Bit-Split vs TF-Lite min/max (seed 004 table shape), error compensation ablation, timing.

Rows {minmax, bitsplit} x {per-layer, per-channel}; one table of weight-only W8..W2 and one of
weights with activations (W8A8, W6A6, W5A5, W4A4, W3A3 and the A8 row W4A8, W3A8, W2A8), top-1 on the Fashion-MNIST test set with 1024 calibration images, plus
an ablation (error compensation, bias correction, activation fit) and the speed of the
vectorised plane fit against the straightforward reference loop. Writes the "bitsplit"
section of benchmarks/RESULTS.md.

    python benchmarks/bitsplit.py [--models resnet20 mobilenetv2] [--configs W4 W4A4 ...]
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit.evaluate import accuracy

from common import add_data_args, load_data, table, write_section, parse_args

# Seed 004's two tables: weight-only W8..W2, and weights with activations (W/A 8..3 plus the A8 row).
DEFAULT_CONFIGS = ["W8", "W7", "W6", "W5", "W4", "W3", "W2",
                   "W8A8", "W6A6", "W5A5", "W4A4", "W3A3", "W4A8", "W3A8", "W2A8"]
ABLATION = [("default: EC, bias correction, MSE act. fit", {}),
            ("no error compensation (as the official code)", {"error_compensation": False}),
            ("no bias correction", {"bias_correction": False}),
            ("activation fit: Lloyd (the paper's) instead of MSE", {"act_method": "lloyd"})]


def parse_config(text: str) -> tuple[int, int | None]:
    m = re.fullmatch(r"W(\d+)(?:A(\d+))?", text)
    if not m:
        raise SystemExit(f"bad config {text!r}: use W4 or W4A4")
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def run(fp, calib, x, y, w, a, method, **opts) -> tuple[float, float]:
    t = time.perf_counter()
    q = lowbit.quantize(fp, calib, w_bits=w, a_bits=a, method=method, **opts)
    secs = time.perf_counter() - t
    return accuracy(q, x, y), secs


def fit_speed() -> str:
    """Reference per-channel loop vs vectorised fit on ResNet-20's layers.0.0.conv2 (16 x 144)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.ptq.test_bitsplit import independent_bitsplit
    from lowbit.ptq.bitsplit import bitsplit_fit

    fp = lowbit.load_pretrained("resnet20")
    W = fp.layers[0][0].conv2.weight.detach().double().flatten(1)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4096, W.shape[1], generator=gen, dtype=torch.float64).relu()
    A, B = X.T @ X, W @ (X.T @ X)
    t = time.perf_counter()
    C = W.shape[0]
    q_ref, _ = independent_bitsplit(A.numpy(), B.numpy(), W.numpy(), 4, np.arange(C), C, iters=4)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    q, _ = bitsplit_fit(A[None], B[None], W[None], 4, torch.arange(W.shape[0]), W.shape[0], iters=4)
    t_fast = time.perf_counter() - t
    same = bool((q[0].numpy() == q_ref).all())
    return (f"Plane fit of a {W.shape[0]} x {W.shape[1]} layer at 4 bit, 4 rounds: reference per-channel, "
            f"per-coordinate loop {t_ref:.2f} s, vectorised {t_fast:.3f} s ({t_ref / t_fast:.0f}x), "
            f"identical integers: {same}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--ablation-configs", nargs="+", default=["W4A4", "W3A3", "W2A8"])
    ap.add_argument("--granularities", nargs="+", default=["tensor", "channel"], choices=["tensor", "channel"])
    args = parse_args(ap)
    calib, x_test, y_test = load_data(args)
    configs = [(c, *parse_config(c)) for c in args.configs]
    for name in args.models:
        fp = lowbit.load_pretrained(name)
        fp_acc = accuracy(fp, x_test, y_test)
        rows, times = [], []
        for method in ("minmax", "bitsplit"):
            for gran in args.granularities:
                label = {"tensor": "per-layer", "channel": "per-channel"}[gran]
                accs, secs = [], []
                for text, w, a in configs:
                    acc, s = run(fp, calib, x_test, y_test, w, a, method, granularity=gran)
                    accs.append(acc)
                    secs.append(s)
                    print(f"{name} {method} {label} {text}: {acc:.2f} ({s:.1f}s)", flush=True)
                rows.append([f"{'TF-Lite min/max' if method == 'minmax' else 'Bit-Split'} {label}"] + accs)
                if method == "bitsplit":
                    times.append([f"Bit-Split {label} seconds"] + secs)
        # Weight-only columns and weight+activation columns as two tables, as in the seed.
        parts = []
        for keep in (lambda a: a is None, lambda a: a is not None):
            cols = [i for i, (_, _, a) in enumerate(configs) if keep(a)]
            if cols:
                parts.append(table(["method"] + [configs[i][0] for i in cols],
                                   [[r[0]] + [r[1 + i] for i in cols] for r in rows + times]))
        main_table = "\n\n".join(parts)
        abl_rows = []
        for label, opts in ABLATION:
            accs = []
            for text in args.ablation_configs:
                w, a = parse_config(text)
                acc, s = run(fp, calib, x_test, y_test, w, a, "bitsplit", **opts)
                accs += [acc, s]
                print(f"{name} ablation {label} {text}: {acc:.2f} ({s:.1f}s)", flush=True)
            abl_rows.append([label] + accs)
        abl_header = ["per-channel Bit-Split"] + [h for t in args.ablation_configs for h in (t, "s")]
        body = (f"## Bit-Split and Stitching vs TF-Lite min/max on {name} (seed 004 table shape)\n\n"
                f"Fashion-MNIST top-1 (%), FP {fp_acc:.2f}%, {args.calib_size} calibration images, {len(x_test)} "
                "test images, BN folded (no BN re-estimation), first conv / last FC at 8-bit weights and last FC "
                "input at 8 bit. `W4` = 4-bit weights, FP activations. Bit-Split defaults: error compensation on, "
                "bias correction on, MSE activation fit, 32768 patch rows per layer, 4 rounds. Seconds = "
                "quantization wall clock on this machine (evaluation excluded; other jobs may have shared the "
                f"CPU).\n\n{main_table}\n\nAblation (top-1 %, seconds):\n\n" + table(abl_header, abl_rows))
        if name == "resnet20":
            body += "\n\n" + fit_speed()
        if not args.no_write:
            write_section(f"bitsplit-{name}", body, [name])
        print(body)


if __name__ == "__main__":
    main()
