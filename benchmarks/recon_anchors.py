"""Block reconstruction anchors: brecq and qdrop at a given iteration budget, symmetric and asymmetric weights.

zoo model x {W2A4, ...} x {qdrop, brecq} x iteration budgets x weight grids, top-1 drop against the
FP model on the Fashion-MNIST test set, 1024 calibration images, standard protocol (first conv and
last FC at 8 bit, network input unquantized). Writes the "recon-anchors-<model>-<methods>" section
of benchmarks/RESULTS.md.

    python benchmarks/recon_anchors.py [--models resnet20] [--configs W2A4] [--methods qdrop brecq]
        [--iters 500 2000] [--weights asym sym] [--eval-size N] [--threads 1]
"""
from __future__ import annotations

import argparse
import re
import time

import torch

import lowbit
from lowbit.evaluate import accuracy

from common import add_data_args, load_data, parse_args, table, write_section

GRIDS = {"asym": False, "sym": True}  # label -> w_symmetric


def parse_config(text: str) -> tuple[int, int | None]:
    m = re.fullmatch(r"W(\d+)(?:A(\d+))?", text)
    if not m:
        raise SystemExit(f"config {text!r} is not WnAm")
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap)
    ap.add_argument("--configs", nargs="+", default=["W2A4"])
    ap.add_argument("--methods", nargs="+", default=["qdrop", "brecq"])
    ap.add_argument("--iters", nargs="+", type=int, default=[500])
    ap.add_argument("--weights", nargs="+", choices=sorted(GRIDS), default=["asym"],
                    help="weight grid: asym (unsigned codes with a zero point) or sym (signed, narrow)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parse_args(ap)
    torch.set_num_threads(args.threads)
    calib, x_test, y_test = load_data(args)
    for name in args.models:
        fp = lowbit.load_pretrained(name)
        fp_acc = accuracy(fp, x_test, y_test)
        rows = []
        for config in args.configs:
            w_bits, a_bits = parse_config(config)
            for method in args.methods:
                for iters in args.iters:
                    for grid in args.weights:
                        t = time.perf_counter()
                        q = lowbit.quantize(fp, calib, w_bits, a_bits, method=method, iters=iters,
                                            w_symmetric=GRIDS[grid], progress=False)
                        secs = time.perf_counter() - t
                        acc = accuracy(q, x_test, y_test)
                        rows.append([config, method, iters, grid, acc, fp_acc - acc, secs])
                        print(f"{name} {config} {method} iters={iters} {grid}: {acc:.2f} "
                              f"(drop {fp_acc - acc:.2f}) {secs:.0f} s", flush=True)
        body = (f"## Block reconstruction anchors on {name}: brecq and qdrop by iteration budget\n\n"
                f"Fashion-MNIST top-1 (%), FP {fp_acc:.2f}%, {len(x_test)} test images, {args.calib_size} "
                "calibration images (seed 0), BN folded, per-channel weights, first conv and last FC at 8-bit "
                "weights, last FC input at 8 bit, network input unquantized; every other option at the "
                "method's default. `grid`: asym = unsigned weight codes with a zero point (the published "
                "QDrop/BRECQ 2-bit grid, four levels), sym = signed narrow codes (ternary at 2 bits). "
                f"`s`: wall-clock seconds of `lowbit.quantize` with {args.threads} thread(s).\n\n"
                + table(["config", "method", "iters/block", "grid", "top-1", "drop", "s"], rows))
        if not args.no_write:
            write_section(f"recon-anchors-{name}-{'-'.join(args.methods)}", body, [name])
        print(body)


if __name__ == "__main__":
    main()
