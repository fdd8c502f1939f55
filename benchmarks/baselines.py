"""Baseline PTQ table in the shape of seed 004's TF-Lite rows.

zoo model x {W8..W3 weights only, WnAn both} x {minmax, mse, aciq} x {per-layer, per-channel},
top-1 on the Fashion-MNIST test set, 1024 calibration images, standard protocol (first conv and
last FC at 8 bit). Writes the "baselines" section of benchmarks/RESULTS.md.

    python benchmarks/baselines.py [--models resnet20 mobilenetv2] [--bits 8 6 4 3] [--eval-size N]
"""
from __future__ import annotations

import argparse
import time

import torch

import lowbit
from lowbit.evaluate import accuracy

from common import add_data_args, load_data, table, write_section, parse_args

METHODS = ["minmax", "mse", "aciq"]
GRANULARITY = {"tensor": "per-layer", "channel": "per-channel"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap)
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4, 3])
    args = parse_args(ap)
    calib, x_test, y_test = load_data(args)
    for name in args.models:
        fp = lowbit.load_pretrained(name)
        fp_acc = accuracy(fp, x_test, y_test)
        header = ["method", "scales"] + [f"W{b}" for b in args.bits] + [f"W{b}A{b}" for b in args.bits] + ["s/config"]
        rows = []
        for method in METHODS:
            for gran, label in GRANULARITY.items():
                accs, secs = [], []
                for a_on in (False, True):
                    for b in args.bits:
                        t = time.perf_counter()
                        q = lowbit.quantize(fp, calib, w_bits=b, a_bits=b if a_on else None, method=method,
                                            granularity=gran)
                        secs.append(time.perf_counter() - t)
                        accs.append(accuracy(q, x_test, y_test))
                        print(f"{name} {method} {label} W{b}{'A%d' % b if a_on else ''}: {accs[-1]:.2f}", flush=True)
                rows.append([method, label] + accs + [sum(secs) / len(secs)])
        body = (f"## Baselines on {name}: TF-Lite min/max, MSE clipping, ACIQ (seed 004 table shape)\n\n"
                f"Fashion-MNIST top-1 (%), FP {fp_acc:.2f}%, {len(x_test)} test images, {args.calib_size} "
                "calibration images, BN folded, first conv and last FC at 8-bit weights, last FC input at 8 bit, "
                "network input unquantized. `W4` = 4-bit weights with FP activations; `W4A4` = both. "
                "`s/config` = mean quantization wall-clock seconds.\n\n" + table(header, rows))
        if not args.no_write:
            write_section(f"baselines-{name}", body, [name])
        print(body)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
