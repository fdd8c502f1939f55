"""TSQ benchmark: Two-Step Quantization vs LSQ at the same epoch budget on the zoo's Fashion-MNIST models.

For each model and configuration (default: ternary weights with 2-bit activations, ``W2A2``
with the narrow signed range {-1, 0, 1}) it runs

* LSQ for ``--epochs`` epochs over the first ``--train-size`` training images;
* TSQ: step 1 (code learning, FP weights and sparse 2-bit activations) for the same epochs,
  step 2 (layer-wise transformation learning), then ``--finetune`` epochs of LSQ fine-tuning;
  the accuracy after step 1, after step 2 alone and after the fine-tune are all reported (the
  test set is passed as ``val_data`` for that: it is only read, nothing is selected on it);

and reports top-1 on the test set, the step-2 solve time per layer and the share of zero input
codes of the body layers (FP network: zeros after ReLU; after TSQ steps 1 and 2). Both methods
distil from the FP model (``--kd``). Writes the ``tsq-<model>`` section of benchmarks/RESULTS.md.

    OMP_NUM_THREADS=1 python benchmarks/tsq.py --models resnet20 --epochs 2 --train-size 5000 --finetune 2
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import lowbit
from lowbit.evaluate import accuracy
from lowbit.quant.layers import quant_layers
from lowbit.quant.sparse import SparseActQuantizer

from common import add_data_args, add_method_option_arg, load_train_test, method_options, parse_args, table, write_section


def fp_zero_share(model: nn.Module, images: torch.Tensor, names: list[str], batch_size: int = 500) -> float:
    """Mean share (%) of exact zeros in the inputs of the named conv / linear layers of the FP model."""
    modules = dict(model.named_modules())
    counts = {n: [0, 0] for n in names if n in modules}

    def hook(name: str):
        def fn(mod, args):
            c = counts[name]
            c[0] += int((args[0] == 0).sum())
            c[1] += args[0].numel()
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in counts]
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                model(images[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return sum(100.0 * z / max(t, 1) for z, t in counts.values()) / max(len(counts), 1)


def mean_over(share: dict[str, float], names: list[str]) -> float:
    vals = [share[n] for n in names if n in share]
    return sum(vals) / max(len(vals), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.set_defaults(models=["resnet20"])
    ap.add_argument("--configs", nargs="+", default=["W2A2"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--finetune", type=int, default=2, help="TSQ fine-tune epochs after step 2")
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--kd", type=float, default=1.0, help="distillation weight from the FP model (both methods)")
    ap.add_argument("--skip-lsq", action="store_true")
    add_method_option_arg(ap)
    ap.add_argument("--tag", default="", help="suffix of the RESULTS.md section name (keeps other runs)")
    args = parse_args(ap)
    extra = method_options(args.option)
    x_train, y_train, x_test, y_test = load_train_test(args.train_size, args.eval_size)
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, kd_weight=args.kd, progress=False)
    for name in args.models:
        fp = lowbit.load_pretrained(name)
        fp_acc = accuracy(fp, x_test, y_test)
        print(f"{name}: FP {fp_acc:.2f}", flush=True)
        rows, layer_tables, zero_rows = [], [], []
        for config in args.configs:
            w, _, a = config.upper().lstrip("W").partition("A")
            w_bits, a_bits = int(w), int(a)
            if not args.skip_lsq:
                torch.manual_seed(0)
                t = time.perf_counter()
                q = lowbit.qat(fp, (x_train, y_train), method="lsq", w_bits=w_bits, a_bits=a_bits,
                               log=lambda s: None, **common, **extra.get("lsq", {}))
                secs = time.perf_counter() - t
                acc = accuracy(q, x_test, y_test)
                rows.append([config, "lsq", args.epochs, acc, fp_acc - acc, f"{secs / 60:.1f}"])
                print(rows[-1], flush=True)
            torch.manual_seed(0)
            t = time.perf_counter()
            q = lowbit.qat(fp, (x_train, y_train), (x_test, y_test), method="tsq", w_bits=w_bits, a_bits=a_bits,
                           finetune_epochs=args.finetune, log=lambda s: print("  " + s, flush=True), **common,
                           **extra.get("tsq", {}))
            secs = time.perf_counter() - t
            rep = lowbit.record_of(q).tsq
            hist = q.lowbit_info["qat"]["history"]
            step1 = hist[-1]["val_acc"]
            step2 = rep["step2_val_acc"]
            acc = accuracy(q, x_test, y_test)
            solve = sum(r["solve_s"] + r["capture_s"] for r in rep["step2"])
            rows.append([config, "tsq step 1 (FP weights, sparse codes)", args.epochs, step1, fp_acc - step1, ""])
            rows.append([config, "tsq step 2 (no fine-tune)", args.epochs, step2, fp_acc - step2, ""])
            if args.finetune:
                rows.append([config, f"tsq + {args.finetune} epoch fine-tune", args.epochs + args.finetune, acc,
                             fp_acc - acc, f"{secs / 60:.1f}"])
            else:
                rows[-1][-1] = f"{secs / 60:.1f}"
            print(rows[-3:], flush=True)
            sparse_names = [n for n, l in quant_layers(q)
                            if isinstance(l.input_quant, SparseActQuantizer)]
            zero_rows.append([config, fp_zero_share(fp, x_test[:1000], sparse_names),
                              mean_over(rep["zero_share_step1"], sparse_names),
                              mean_over(rep["zero_share"], sparse_names), len(sparse_names)])
            layer_tables.append(
                f"Step 2 per layer ({config}; {solve:.0f} s in all, capture + solve):\n\n" + table(
                    ["layer", "Q", "rows x inputs x channels", "rel. error init", "rel. error", "capture s", "solve s"],
                    [[r["layer"], r["target"], f"{r['rows']} x {r['inputs']} x {r['channels']}", r["rel_error_init"],
                     r["rel_error"], r["capture_s"], r["solve_s"]] for r in rep["step2"]]))
        head = (f"### {name}: TSQ vs LSQ, {args.epochs} epochs over the first {len(x_train)} training images, "
                f"batch {args.batch_size}, SGD lr {args.lr} cosine, distilled from the FP model (kd weight {args.kd})"
                + (f", options {extra}" if extra else "")
                + f" (FP {fp_acc:.2f} on {len(x_test)} test images). Machine shared with other jobs "
                  f"(OMP_NUM_THREADS=1, 2 cores for ~6 processes): minutes are contended wall time, not speed "
                  f"claims. W2 is ternary ({{-1, 0, 1}} per-channel scales); first conv and last FC at 8 bit.\n\n")
        body = head + table(["config", "method", "epochs", "top-1", "drop", "min"], rows)
        body += ("\n\nShare of zero input codes of the sparse-quantized layers (mean over layers, %; FP: exact "
                 "zeros after ReLU on 1000 test images; TSQ: on the calibration images):\n\n"
                 + table(["config", "FP", "after step 1", "after step 2 / fine-tune", "layers"], zero_rows))
        body += "\n\n" + "\n\n".join(layer_tables)
        print(body, flush=True)
        if not args.no_write:
            write_section(f"tsq-{name}" + (f"-{args.tag}" if args.tag else ""), body, [name])


if __name__ == "__main__":
    main()
