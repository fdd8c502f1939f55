"""Histogram of one layer's weights before and after GDRQ's Scale-Clip (k * mean|w|), 2 and 4 bit.

Writes benchmarks/figures/scale_clip_<model>.png and the ``scale-clip-<model>`` section of
benchmarks/RESULTS.md (how many weights the clip touches and how uniform the codes are).

    python benchmarks/scale_clip_hist.py --model resnet20 --layer layers.1.1.conv1
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import lowbit
from lowbit.qat.gdrq import scale_clip_threshold

from common import table, write_section, parse_args

FIGURES = Path(__file__).with_name("figures")


def entropy_bits(codes: torch.Tensor) -> float:
    _, counts = codes.unique(return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--layer", default="layers.1.1.conv1")
    ap.add_argument("--k", type=float, default=2.5)
    ap.add_argument("--no-write", action="store_true")
    args = parse_args(ap)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = lowbit.load_pretrained(args.model)
    w = dict(fp.named_modules())[args.layer].weight.detach().flatten()
    t = scale_clip_threshold(w.view(1, -1), args.k).item()
    clipped = w.clamp(-t, t)
    rows = []
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].hist(w.numpy(), bins=80, color="tab:blue")
    axes[0].set_title(f"{args.layer}: FP weights")
    for ax, bits in zip(axes[1:], (2, 4)):
        qmax = 2 ** (bits - 1) - 1
        codes_clip = torch.round(clipped / (t / qmax))
        codes_max = torch.round(w / (w.abs().max() / qmax))
        ax.hist(clipped.numpy(), bins=80, color="tab:orange")
        for c in range(-qmax, qmax + 1):
            ax.axvline(c * t / qmax, color="k", lw=0.6, ls=":")
        ax.set_title(f"Scale-Clip T={args.k}*mean|w|, {bits}-bit levels")
        rows.append([bits, f"{100 * (w.abs() > t).float().mean().item():.1f}%",
                     f"{entropy_bits(codes_max):.2f}", f"{entropy_bits(codes_clip):.2f}",
                     f"{math.log2(2 * qmax + 1):.2f}"])
    fig.tight_layout()
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"scale_clip_{args.model}.png"
    fig.savefig(path, dpi=90)
    body = (f"### {args.model} {args.layer}: Scale-Clip reshaping (k = {args.k})\n\n"
            f"![weight histogram before and after Scale-Clip](figures/{path.name})\n\n"
            + table(["bits", "weights clipped", "code entropy, max-scaled (bits)",
                     "code entropy, Scale-Clip (bits)", "uniform (max)"], rows))
    print(body)
    if not args.no_write:
        write_section(f"scale-clip-{args.model}", body, [args.model])


if __name__ == "__main__":
    main()
