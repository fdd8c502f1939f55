"""DMBQ (+ LBA) QAT on the zoo ResNet-20 (Fashion-MNIST), short schedule from the pretrained FP model.

Seed 002's table shapes, scaled to a shared 2-core CPU:
* Uniform (LSQ) vs DMBQ at W2/A2, same schedule, seeds 0 and 1;
* DMBQ + LBA at the same average weight bits: CP (per channel) vs LP (per layer) vs GP (global);
* DMBQ's alphas from the table vs solved on each tensor at every step vs LQ-Net's one step;
* training seconds per epoch of each run, and of plain FP training with the same loop, measured
  in this run (FP = the engine's train_step on the unquantized model).
Training on the first ``--train`` training images, ``--epochs`` epochs, batch 128, lr 0.01
(cosine), BN kept during training; top-1 on the first ``--test`` test images.

Run: PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/dmbq_qat.py
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import load_fashion_mnist
from lowbit.evaluate import accuracy
from lowbit.qat.lba import bit_map, bit_map_markdown, bit_map_png
from lowbit.train import train_step

from common import parse_args, table, write_section

FIGURES = Path(__file__).with_name("figures")


def fp_epoch_seconds(model, x, y, batch: int, lr: float) -> float:
    """One epoch of FP training with the QAT engine's step (augmentation on), seconds."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(math.ceil(len(x) / batch)):
        train_step(model, opt, sched, x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch], gen, True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lba-every", type=int, default=4)
    ap.add_argument("--runs", default="fp,lsq0,dmbq0,lsq1,dmbq1,gp,lp,cp",
                    help="comma-separated subset of fp,lsq0,lsq1,dmbq0,dmbq1,solve,lqnet,gp,lp,cp,cp15")
    ap.add_argument("--section", default="dmbq-qat", help="RESULTS.md section to write")
    ap.add_argument("--no-write", action="store_true")
    args = parse_args(ap)
    torch.set_num_threads(1)
    fp = lowbit.load_pretrained("resnet20")
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    x, y = x_train[:args.train], y_train[:args.train]
    xt, yt = x_test[:args.test], y_test[:args.test]
    common = dict(epochs=args.epochs, batch_size=128, lr=0.01, progress=False, log=lambda s: None)
    runs = {
        "lsq0": ("Uniform (LSQ)", "2/2", dict(method="lsq", w_bits=2, a_bits=2, seed=0)),
        "lsq1": ("Uniform (LSQ)", "2/2", dict(method="lsq", w_bits=2, a_bits=2, seed=1)),
        "dmbq0": ("DMBQ", "2/2", dict(method="dmbq", w_bits=2, a_bits=2, seed=0)),
        "dmbq1": ("DMBQ", "2/2", dict(method="dmbq", w_bits=2, a_bits=2, seed=1)),
        "solve": ("DMBQ, solve per step", "2/2", dict(method="dmbq", w_bits=2, a_bits=2, solver="solve", seed=0)),
        "lqnet": ("DMBQ, LQ-Net step", "2/2", dict(method="dmbq", w_bits=2, a_bits=2, solver="lqnet", seed=0)),
        "gp": ("DMBQ+LBA GP", "2.0/2", dict(method="dmbq", w_bits=2.0, a_bits=2, lba="global", seed=0)),
        "lp": ("DMBQ+LBA LP", "2.0/2", dict(method="dmbq", w_bits=2.0, a_bits=2, lba="layer",
                                            lba_every=args.lba_every, seed=0)),
        "cp": ("DMBQ+LBA CP", "2.0/2", dict(method="dmbq", w_bits=2.0, a_bits=2, lba="channel",
                                            lba_every=args.lba_every, seed=0)),
        "cp15": ("DMBQ+LBA CP", "1.5/2", dict(method="dmbq", w_bits=1.5, a_bits=2, lba="channel",
                                              lba_every=args.lba_every, seed=0)),
    }
    wanted = args.runs.split(",")
    fp_acc = accuracy(fp, xt, yt)
    fp_sec = fp_epoch_seconds(fp, x, y, 128, 0.01) if "fp" in wanted else float("nan")
    rows, results, maps = [], {}, {}
    lsq_sec = []
    for key in wanted:
        if key == "fp":
            continue
        label, prec, kw = runs[key]
        start = time.perf_counter()
        q = lowbit.qat(fp, (x, y), **common, **kw)
        wall = time.perf_counter() - start
        acc = accuracy(q, xt, yt)
        hist = q.lowbit_info["qat"]["history"]
        sec = sum(h["seconds"] for h in hist) / len(hist)
        s = lowbit.summary(q)
        body = [r for r in s.layers if r.role == "body"]
        body_bits = sum(r.params * r.w_bits for r in body) / sum(r.params for r in body)
        results[key] = (acc, sec)
        if kw["method"] == "lsq":
            lsq_sec.append(sec)
        if key in ("cp", "lp", "cp15"):
            maps[key] = bit_map(q)
        rows.append([label, prec, kw.get("seed", 0), f"{acc:.2f}", f"{body_bits:.3f}",
                     f"{s.totals['model_bytes'] / 2**20:.4f}", s.totals["pruned_channels"], f"{sec:.1f}",
                     f"{sec / fp_sec:.2f}x" if fp_sec == fp_sec else "-", f"{wall:.0f}"])
        print(rows[-1], flush=True)
    lsq_ref = sum(lsq_sec) / len(lsq_sec) if lsq_sec else float("nan")
    for r in rows:
        r.insert(9, f"{float(r[7]) / lsq_ref:.2f}x" if lsq_ref == lsq_ref else "-")
    header = ["method", "W/A", "seed", "top-1", "avg body W bits", "size MB", "pruned ch.", "s/epoch",
              "vs FP", "vs LSQ", "wall s"]
    text = (f"### DMBQ + LBA QAT, zoo ResNet-20, Fashion-MNIST (seed 002 table shapes)\n\n"
            f"**Short schedule on a shared machine** (2 cores shared with other jobs; timings are "
            f"contended, not speed claims): {args.epochs} epochs on the first {args.train} training images, "
            f"batch 128, SGD lr 0.01 cosine, from the pretrained FP model (FP top-1 {fp_acc:.2f} on the "
            f"first {args.test} test images, where every top-1 here is measured). First conv and last FC at "
            f"8 bit (protocol). LBA moves a bit every {args.lba_every} steps; GP = one width for the whole "
            f"network (no move possible at a whole budget). FP epoch (same loop, unquantized): "
            f"{fp_sec:.1f} s.\n\n" + table(header, rows))
    for key, m in maps.items():
        FIGURES.mkdir(exist_ok=True)
        png = FIGURES / f"dmbq_bits_{key}.png"
        bit_map_png(m, str(png), f"ResNet-20 {runs[key][0]} {runs[key][1]}: bits per output channel")
        text += f"\n\nBit map, {runs[key][0]} {runs[key][1]} (`benchmarks/figures/{png.name}`):\n\n" + bit_map_markdown(m)
    print(text)
    if not args.no_write:
        write_section(args.section, text, ["resnet20"])


if __name__ == "__main__":
    main()
