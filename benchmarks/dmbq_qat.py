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
from lowbit.qat.dmbq import DmbqOptions
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
                    help="comma-separated runs: fp and NAME or NAME:SEED, NAME one of lsq, dmbq, solve, lqnet, "
                         "table, lsq3, dmbq3, lsq4, dmbq4, gp, lp, cp, cpone, cpm, cp15, gp10, lp10, cp10, cp10m "
                         "(cpm, cp10m: LBA score 'move'; lsq0, lsq1, "
                         "dmbq0, dmbq1 = lsq:0, ...)")
    ap.add_argument("--lba-fraction", type=float, default=None,
                    help="share of LBA units that may gain a bit per reallocation (default: the method's)")
    ap.add_argument("--solver", default=None, help="DMBQ solver of the runs that do not name one "
                    "(default: the method's)")
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
    lba = dict(lba_every=args.lba_every)
    if args.lba_fraction is not None:
        lba["lba_fraction"] = args.lba_fraction
    configs = {  # name -> (label, W/A, qat keywords); a run is NAME or NAME:SEED (seed 0 by default)
        "lsq": ("Uniform (LSQ)", "2/2", dict(method="lsq", w_bits=2, a_bits=2)),
        "dmbq": ("DMBQ", "2/2", dict(method="dmbq", w_bits=2, a_bits=2)),
        "solve": ("DMBQ, solve per step", "2/2", dict(method="dmbq", w_bits=2, a_bits=2, solver="solve")),
        "lqnet": ("DMBQ, LQ-Net step", "2/2", dict(method="dmbq", w_bits=2, a_bits=2, solver="lqnet")),
        "table": ("DMBQ, table", "2/2", dict(method="dmbq", w_bits=2, a_bits=2, solver="table")),
        "lsq3": ("Uniform (LSQ)", "3/3", dict(method="lsq", w_bits=3, a_bits=3)),
        "dmbq3": ("DMBQ", "3/3", dict(method="dmbq", w_bits=3, a_bits=3)),
        "solve3": ("DMBQ, solve per step", "3/3", dict(method="dmbq", w_bits=3, a_bits=3, solver="solve")),
        "lqnet3": ("DMBQ, LQ-Net step", "3/3", dict(method="dmbq", w_bits=3, a_bits=3, solver="lqnet")),
        "table3": ("DMBQ, table", "3/3", dict(method="dmbq", w_bits=3, a_bits=3, solver="table")),
        "lqnet4": ("DMBQ, LQ-Net step", "4/4", dict(method="dmbq", w_bits=4, a_bits=4, solver="lqnet")),
        "table4": ("DMBQ, table", "4/4", dict(method="dmbq", w_bits=4, a_bits=4, solver="table")),
        "lsq4": ("Uniform (LSQ)", "4/4", dict(method="lsq", w_bits=4, a_bits=4)),
        "dmbq4": ("DMBQ", "4/4", dict(method="dmbq", w_bits=4, a_bits=4)),
        "gp": ("DMBQ+LBA GP", "2.0/2", dict(method="dmbq", w_bits=2.0, a_bits=2, lba="global")),
        "lp": ("DMBQ+LBA LP", "2.0/2", dict(method="dmbq", w_bits=2.0, a_bits=2, lba="layer", **lba)),
        "cp": ("DMBQ+LBA CP", "2.0/2", dict(method="dmbq", w_bits=2.0, a_bits=2, lba="channel", **lba)),
        "cpone": ("DMBQ+LBA CP, 1 unit per move", "2.0/2",
                  dict(method="dmbq", w_bits=2.0, a_bits=2, lba="channel", **dict(lba, lba_fraction=0.0))),
        "cpm": ("DMBQ+LBA CP, move score", "2.0/2",
                dict(method="dmbq", w_bits=2.0, a_bits=2, lba="channel", lba_score="move", **lba)),
        "cp10m": ("DMBQ+LBA CP, move score", "1.0/2",
                  dict(method="dmbq", w_bits=1.0, a_bits=2, lba="channel", lba_score="move", **lba)),
        "cp15": ("DMBQ+LBA CP", "1.5/2", dict(method="dmbq", w_bits=1.5, a_bits=2, lba="channel", **lba)),
        "gp10": ("DMBQ+LBA GP", "1.0/2", dict(method="dmbq", w_bits=1.0, a_bits=2, lba="global")),
        "cp07": ("DMBQ+LBA CP", "0.7/32", dict(method="dmbq", w_bits=0.7, a_bits=None, lba="channel", **lba)),
        "gdrq": ("GDRQ", "2/2", dict(method="gdrq", w_bits=2, a_bits=2)),
        "lp10": ("DMBQ+LBA LP", "1.0/2", dict(method="dmbq", w_bits=1.0, a_bits=2, lba="layer", **lba)),
        "cp10": ("DMBQ+LBA CP", "1.0/2", dict(method="dmbq", w_bits=1.0, a_bits=2, lba="channel", **lba)),
    }
    legacy = {"lsq0": "lsq:0", "lsq1": "lsq:1", "dmbq0": "dmbq:0", "dmbq1": "dmbq:1"}  # older command lines
    runs = {}
    for key in args.runs.split(","):
        name, _, seed = legacy.get(key, key).partition(":")
        if key == "fp":
            continue
        if name not in configs:
            ap.error(f"unknown run {key!r}: one of fp, {', '.join(configs)} (optionally NAME:SEED)")
        label, prec, kw = configs[name]
        runs[key] = (label, prec, dict(kw, seed=int(seed or 0)), name)
    wanted = args.runs.split(",")
    if args.solver:  # the solver of every DMBQ run that does not name its own
        for key, (label, prec, kw, name) in runs.items():
            if kw["method"] == "dmbq" and name not in ("solve", "lqnet", "table"):
                kw.setdefault("solver", args.solver)
    fp_acc = accuracy(fp, xt, yt)
    fp_sec = fp_epoch_seconds(fp, x, y, 128, 0.01) if "fp" in wanted else float("nan")
    rows, results, maps = [], {}, {}
    lsq_sec: dict[str, list[float]] = {}  # LSQ seconds per epoch by W/A: the "vs LSQ" reference
    for key in runs:
        label, prec, kw, name = runs[key]
        start = time.perf_counter()
        q = lowbit.qat(fp, (x, y), **common, **kw)
        wall = time.perf_counter() - start
        acc = accuracy(q, xt, yt)
        hist = q.lowbit_info["qat"]["history"]
        sec = sum(h["seconds"] for h in hist) / len(hist)
        s = lowbit.summary(q)
        body = [r for r in s.layers if r.role == "body"]
        body_bits = sum(r.params * r.w_bits for r in body) / sum(r.params for r in body)
        results.setdefault((label, prec), []).append(acc)
        if kw["method"] == "lsq":
            lsq_sec.setdefault(prec, []).append(sec)
        if kw.get("lba") in ("channel", "layer") and name not in maps:
            maps[name] = (bit_map(q), label, prec)
        rows.append([label, prec, kw.get("seed", 0), f"{acc:.2f}", f"{body_bits:.3f}",
                     f"{s.totals['model_bytes'] / 2**20:.4f}", s.totals["pruned_channels"], f"{sec:.1f}",
                     f"{sec / fp_sec:.2f}x" if fp_sec == fp_sec else "-", f"{wall:.0f}"])
        print(rows[-1], flush=True)
    for r in rows:  # against LSQ at the same W/A (2.0/2 compares with 2/2), "-" without one
        ref = lsq_sec.get(r[1].replace(".0/", "/"))
        r.insert(9, f"{float(r[7]) / (sum(ref) / len(ref)):.2f}x" if ref else "-")
    defaults = DmbqOptions()
    solver = args.solver or defaults.solver
    fraction = args.lba_fraction if args.lba_fraction is not None else defaults.lba_fraction
    header = ["method", "W/A", "seed", "top-1", "avg body W bits", "size MB", "pruned ch.", "s/epoch",
              "vs FP", "vs LSQ", "wall s"]
    text = (f"### DMBQ + LBA QAT, zoo ResNet-20, Fashion-MNIST (seed 002 table shapes)\n\n"
            f"**Short schedule on a shared machine** (2 cores shared with other jobs; timings are "
            f"contended, not speed claims): {args.epochs} epochs on the first {args.train} training images, "
            f"batch 128, SGD lr 0.01 cosine, from the pretrained FP model (FP top-1 {fp_acc:.2f} on the "
            f"first {args.test} test images, where every top-1 here is measured). First conv and last FC at "
            f"8 bit (protocol). DMBQ rows without a solver in their label use solver={solver}. LBA "
            f"reallocates every {args.lba_every} steps, each time up to max(1, {fraction} x units) units gain "
            f"a bit (LP: 18 layer units, CP: one per output channel); GP = one width for the whole "
            f"network (no move possible at a whole budget). FP epoch (same loop, unquantized): "
            + (f"{fp_sec:.1f} s." if fp_sec == fp_sec else "not measured in this run.") + "\n\n" + table(header, rows))
    multi = [(k, v) for k, v in results.items() if len(v) > 1]
    if multi:
        text += "\n\nMean top-1 over seeds:\n\n" + table(
            ["method", "W/A", "seeds", "mean top-1", "min", "max"],
            [[k[0], k[1], len(v), f"{sum(v) / len(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}"] for k, v in multi])
    for name, (m, label, prec) in maps.items():
        # one file per section and run name: sections that share a run name keep their own maps
        suffix = "" if args.section == "dmbq-qat" else "_" + args.section.removeprefix("dmbq-").replace("-", "_")
        png = FIGURES / f"dmbq_bits_{name}{suffix}.png"
        if not args.no_write:  # a --no-write run leaves the committed figures alone too
            FIGURES.mkdir(exist_ok=True)
            bit_map_png(m, str(png), f"ResNet-20 {label} {prec}: bits per output channel")
        text += f"\n\nBit map, {label} {prec} (`benchmarks/figures/{png.name}`):\n\n" + bit_map_markdown(m)
    print(text)
    if not args.no_write:
        write_section(args.section, text, ["resnet20"])


if __name__ == "__main__":
    main()
