"""Accuracy against weight size: uniform W2/W3/W4 against mixed per-layer maps from sensitivity.

For each model: weight sensitivity per layer at 2/3/4/8 bits (``lowbit.sensitivity``, each
``--metrics``), then ``lowbit.allocate_bits`` maps at each ``--averages`` (parameter-weighted
average weight bits, first and last layer fixed at 8 bits and counted in the budget), quantized
with each ``--quantizers`` method at each ``--a-bits`` beside the uniform maps (``w_bits=b``, same
first/last protocol). Every row states the true average weight bits of the quantized layers and
the packed weight size in MB (``lowbit.summary``: weights at their widths + per-channel scales).
Writes the ``mixed-<model>`` section of benchmarks/RESULTS.md and a PNG of the curves under
benchmarks/figures/ unless ``--no-write``.

    python benchmarks/mixed_precision.py [--models resnet20 mobilenetv2] [--quantizers mse bitsplit]
        [--a-bits 8 4] [--averages 2.0 2.5 3.0 3.5] [--metrics kl taylor] [--sensitivity-images 256]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import lowbit
from lowbit import LowbitError
from lowbit.data import load_fashion_mnist, sample_calibration
from lowbit.evaluate import accuracy

from common import add_data_args, load_data, parse_args, table, write_section

FIGURES = Path(__file__).with_name("figures")


def quantize_row(fp, calib, x, y, method: str, a_bits: int, **kw) -> tuple[float, float, float, float]:
    """top-1, true average weight bits of the quantized layers, weight MB, seconds."""
    t = time.perf_counter()
    q = lowbit.quantize(fp, calib, a_bits=a_bits, method=method, progress=False, **kw)
    secs = time.perf_counter() - t
    totals = lowbit.summary(q).totals
    return accuracy(q, x, y), totals["avg_w_bits_quantized"], totals["weight_bytes"] / 2 ** 20, secs


def plot(name: str, curves: dict[str, list[tuple[float, float]]], fp_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in curves.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if "uniform" in label else "s",
                linestyle="--" if "uniform" in label else "-", label=label)
    ax.axhline(fp_acc, color="gray", linewidth=0.8, label="FP32")
    ax.set_xlabel("weight size (MB, packed, with scales)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{name}: uniform vs mixed per-layer weight bits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap)
    ap.add_argument("--quantizers", nargs="+", default=["mse", "bitsplit"])
    ap.add_argument("--a-bits", nargs="+", type=int, default=[8, 4])
    ap.add_argument("--uniform", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--averages", nargs="+", type=float, default=[2.0, 2.5, 3.0, 3.5])
    ap.add_argument("--metrics", nargs="+", default=["kl", "taylor"], choices=["kl", "taylor"])
    ap.add_argument("--sensitivity-images", type=int, default=256)
    args = parse_args(ap)
    calib, x, y = load_data(args)
    sens_calib = sample_calibration(load_fashion_mnist("train")[0], args.sensitivity_images, seed=1)
    for name in args.models:
        fp = lowbit.load_pretrained(name)
        fp_acc = accuracy(fp, x, y)
        maps, timing = {}, []
        for metric in args.metrics:
            report = lowbit.sensitivity(fp, sens_calib, bits=(2, 3, 4, 8), target="weights", metric=metric,
                                        progress=False)
            timing.append(f"sensitivity `{metric}` {report.seconds:.0f} s")
            for avg in args.averages:
                t = time.perf_counter()
                try:
                    maps[(metric, avg)] = lowbit.allocate_bits(report=report, avg_w_bits=avg,
                                                               candidates=(2, 3, 4, 8))
                except LowbitError as e:  # e.g. the 8-bit first and last layers alone exceed the budget
                    timing.append(f"average {avg} not reachable ({e})")
                    continue
                timing.append(f"allocation `{metric}` {avg} {time.perf_counter() - t:.2f} s")
            print(f"{name}: {timing}", flush=True)
        rows, curves = [], {}
        for method in args.quantizers:
            for a in args.a_bits:
                runs = [(f"uniform W{b}", {"w_bits": b}) for b in args.uniform]
                runs += [(f"mixed {avg} ({metric})", {"layer_bits": m}) for (metric, avg), m in maps.items()]
                for label, kw in runs:
                    acc, avg_bits, mb, secs = quantize_row(fp, calib, x, y, method, a, **kw)
                    rows.append([f"`{method}`", f"A{a}", label, f"{avg_bits:.3f}", f"{mb:.4f}", acc,
                                 fp_acc - acc, f"{secs:.0f}"])
                    kind = "uniform" if label.startswith("uniform") else f"mixed {label.split('(')[1][:-1]}"
                    curves.setdefault(f"{method} A{a} {kind}", []).append((mb, acc))
                    print(rows[-1], flush=True)
        body = (f"## Mixed precision on {name}: accuracy against weight size (issue #15 benchmark)\n\n"
                f"Fashion-MNIST top-1 (%), FP {fp_acc:.2f}% on {len(x)} test images, {len(calib)} calibration "
                f"images, per-channel weight scales (method defaults), BN folded, first conv and last FC at "
                f"8-bit weights (counted in every average), last FC input at 8 bit, network input "
                f"unquantized. Mixed maps: `lowbit.allocate_bits` (DP, widths 2/3/4/8) from a weight "
                f"sensitivity report on {len(sens_calib)} other training images. `avg bits` = true "
                f"parameter-weighted average weight bits of the quantized layers; `MB` = packed weights at "
                f"their widths + one float32 scale per output channel. Seconds = quantization wall clock.\n\n"
                + table(["method", "act.", "weights", "avg bits", "MB", "top-1", "drop", "s"], rows)
                + "\n\nTimes: " + "; ".join(timing) + ".")
        print(body, flush=True)
        if not args.no_write:
            FIGURES.mkdir(exist_ok=True)
            png = FIGURES / f"mixed_{name}.png"
            plot(name, curves, fp_acc, png)
            body += f"\n\n![accuracy against size]({png.relative_to(Path(__file__).parent)})"
            write_section(f"mixed-{name}", body, [name])


if __name__ == "__main__":
    main()
