"""Seed 004 Table 4 shape: post-training methods with per-layer (unified) weight scales, W4A8 and W4A4.

TF-Lite min/max, TensorRT entropy calibration (kl), LAPQ, ACIQ, ACIQ-Mix, MSE clipping and Bit-Split,
top-1 on the Fashion-MNIST test set with per-layer weight scales (``granularity="tensor"``), 1024
calibration images, the standard protocol (first conv and last FC at 8 bit, network input
unquantized), and the quantization wall-clock seconds of each. ACIQ-Mix runs with per-channel
scales and widths (as in the seed's table, where it is the one row that is neither per-layer nor
unified precision); ``--methods aciq:channel`` runs any method with another granularity. Writes
the ``table4-<model>`` section of benchmarks/RESULTS.md unless ``--no-write``.

    python benchmarks/ptq_table4.py [--models resnet20] [--configs W4A8 W4A4] [--eval-size 2000]
        [--methods minmax kl lapq aciq aciq-mix mse bitsplit] [--option lapq iters=1]
"""
from __future__ import annotations

import argparse
import time

import torch

import lowbit
from lowbit.evaluate import accuracy

from common import add_data_args, add_method_option_arg, load_data, method_options, table, write_section, parse_args

METHODS = ["minmax", "kl", "lapq", "aciq", "aciq-mix", "mse", "bitsplit"]
LABELS = {"minmax": "TF-Lite min/max", "kl": "TensorRT (KL)", "lapq": "LAPQ", "aciq": "ACIQ",
          "aciq-mix": "ACIQ-Mix", "mse": "MSE clipping", "bitsplit": "Bit-Split"}
# methods that are not per-layer in the seed's table: ACIQ-Mix allocates widths per channel, which
# needs a scale per channel
GRANULARITY = {"aciq-mix": "channel"}


def parse_method(text: str) -> tuple[str, str]:
    """``"aciq"`` -> (aciq, its table granularity); ``"aciq:channel"`` -> (aciq, channel)."""
    name, _, gran = text.partition(":")
    return name, gran or GRANULARITY.get(name, "tensor")


def parse_config(text: str) -> tuple[int, int | None]:
    w, _, a = text.upper().lstrip("W").partition("A")
    return int(w), (int(a) if a else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap)
    add_method_option_arg(ap)
    ap.set_defaults(models=["resnet20"])
    ap.add_argument("--configs", nargs="+", default=["W4A8", "W4A4"])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    args = parse_args(ap)
    opts = method_options(args.option)
    calib, x_test, y_test = load_data(args)
    for name in args.models:
        fp = lowbit.load_pretrained(name)
        fp_acc = accuracy(fp, x_test, y_test)
        rows = []
        for spec in args.methods:
            method, gran = parse_method(spec)
            scales = "" if gran == "tensor" else f", per-{gran} scales"
            row = [f"{LABELS.get(method, method)} (`{method}`{scales})"]
            for config in args.configs:
                w, a = parse_config(config)
                start = time.perf_counter()
                q = lowbit.quantize(fp, calib, w_bits=w, a_bits=a, method=method, granularity=gran,
                                    **opts.get(method, {}))
                secs = time.perf_counter() - start
                row += [accuracy(q, x_test, y_test), f"{secs:.0f}"]
                print(f"{name} {spec} {config}: {row[-2]:.2f} ({secs:.0f} s)", flush=True)
            rows.append(row)
        header = ["method"] + [h for c in args.configs for h in (c, "s")]
        body = (f"## Seed 004 Table 4 shape on {name}: per-layer (unified) weight scales\n\n"
                f"Fashion-MNIST top-1 (%), FP {fp_acc:.2f}%, {len(x_test)} test images, {args.calib_size} "
                "calibration images, per-layer symmetric weight scales (unless a row says otherwise; ACIQ-Mix "
                "allocates widths per channel averaging the row's W bits, so it has per-channel scales as in the "
                "seed's table), unsigned activations after ReLU "
                "(zero point otherwise), BN folded, first conv and last FC at 8-bit weights, last FC input "
                "at 8 bit, network input unquantized; `s` = quantization wall-clock seconds "
                f"({torch.get_num_threads()} threads, on a machine shared with other jobs: not speed claims). "
                f"Method options: {opts or 'defaults'}.\n\n"
                + table(header, rows))
        if not args.no_write:
            write_section(f"table4-{name}", body, [name])
        print(body)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
