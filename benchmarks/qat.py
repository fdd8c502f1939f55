"""QAT benchmark: LSQ and GDRQ (G = 1, 4, 8) at W4A4, W2A4, W2A2 on the zoo's Fashion-MNIST models.

Each run fine-tunes the shipped FP checkpoint for --epochs passes over the first --train-size
training images and reports top-1 on the test set, minutes, and the time per epoch relative
to plain FP training of the same model on the same images, measured in this run. Writes the
``qat-<model>`` section of benchmarks/RESULTS.md.

    python benchmarks/qat.py --models resnet20 --epochs 2 --train-size 20000
"""
from __future__ import annotations

import argparse
import time

import torch

import lowbit
from lowbit.evaluate import accuracy
from lowbit.train import TrainConfig, train_model

from common import add_data_args, add_method_option_arg, load_train_test, method_options, parse_args, table, write_section

RUNS = [("lsq", {}), ("gdrq", {"granularity": "tensor"}), ("gdrq", {"granularity": "group", "groups": 4}),
        ("gdrq", {"granularity": "group", "groups": 8}),
        # the seed's ablation: groups without Scale-Clip (plain max thresholds)
        ("gdrq", {"granularity": "group", "groups": 4, "scale_clip": False})]


def label(method: str, opts: dict) -> str:
    if method == "gdrq":
        return f"gdrq G={opts.get('groups', 1)}" + (" no Scale-Clip" if opts.get("scale_clip") is False else "")
    return method


def fp_epoch_seconds(name: str, x, y, batch_size: int) -> float:
    """Seconds of one FP training epoch of a copy of the checkpoint over ``x`` (same images as QAT)."""
    model = lowbit.load_pretrained(name)
    t = time.perf_counter()
    train_model(model, x, y, cfg=TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3), progress=False,
                log=lambda s: None)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument("--configs", nargs="+", default=["W4A4", "W2A4", "W2A2"])
    ap.add_argument("--runs", nargs="+", default=[label(m, o) for m, o in RUNS])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--kd", type=float, default=0.0, help="distillation weight from the FP model (QatConfig.kd_weight)")
    add_method_option_arg(ap)
    ap.add_argument("--tag", default="", help="suffix of the RESULTS.md section name (keeps other runs)")
    args = parse_args(ap)
    extra = method_options(args.option)
    x_train, y_train, x_test, y_test = load_train_test(args.train_size, args.eval_size)
    for name in args.models:
        fp = lowbit.load_pretrained(name)
        fp_acc = accuracy(fp, x_test, y_test)
        fp_epoch = fp_epoch_seconds(name, x_train, y_train, args.batch_size)
        print(f"{name}: FP {fp_acc:.2f}, FP epoch {fp_epoch:.0f}s", flush=True)
        rows = []
        for method, opts in RUNS:
            if label(method, opts) not in args.runs:
                continue
            row = [label(method, opts)]
            for config in args.configs:
                w, _, a = config.upper().lstrip("W").partition("A")
                torch.manual_seed(0)
                t = time.perf_counter()
                q = lowbit.qat(fp, (x_train, y_train), method=method, w_bits=int(w), a_bits=int(a),
                               epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, progress=False,
                               log=lambda s: None, kd_weight=args.kd, **opts, **extra.get(method, {}))
                secs = time.perf_counter() - t
                per_epoch = sum(h["seconds"] for h in q.lowbit_info["qat"]["history"]) / args.epochs
                acc = accuracy(q, x_test, y_test)
                row += [acc, fp_acc - acc, f"{secs / 60:.1f}", f"{per_epoch / fp_epoch:.2f}x"]
                print(row, flush=True)
            rows.append(row)
        head = (f"### {name}: QAT, {args.epochs} epochs over the first {len(x_train)} training images, "
                f"batch {args.batch_size}, SGD lr {args.lr} cosine"
                + (f", distilled from the FP model (kd weight {args.kd})" if args.kd else "")
                + (f", options {extra}" if extra else "")
                + f" (FP {fp_acc:.2f}; FP training epoch {fp_epoch:.0f} s on the same images)\n\n")
        cols = ["method"] + [c for config in args.configs for c in (config, "drop", "min", "epoch vs FP")]
        body = head + table(cols, rows)
        print(body, flush=True)
        if not args.no_write:
            write_section(f"qat-{name}" + (f"-{args.tag}" if args.tag else ""), body, [name])


if __name__ == "__main__":
    main()
