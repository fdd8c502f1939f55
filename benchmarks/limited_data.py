"""Limited-data PTQ (seed 000 table shapes): granularity, two-stage distillation ablation, methods.

Sections of benchmarks/RESULTS.md written (one per model and table):

* ``limited-<model>-granularity``: weights-only W6/W4/W3 top-1 for per-channel, per-layer,
  cross-layer equalization (+ per-layer) and G = 2/4/8/16 groups, min/max and MSE init.
* ``limited-<model>-ablation``: two-stage distillation at --ablation-config: init (MSE),
  global (joint) only, block-wise only, both; per-channel and 8 groups.
* ``limited-<model>-methods``: W4A4 and W2A4 for minmax, mse, bitsplit, brecq, qdrop and
  distill, with wall-clock time.
* ``limited-resnet20-curve``: accuracy and time of --curve-method against iterations per block,
  and against the number of calibration images (1024 / 256 / 64).

Weights are asymmetric per channel (four 2-bit levels) except for bitsplit, whose 2-bit weights
are one ternary plane; 1024 calibration images unless stated.

    python benchmarks/limited_data.py --models resnet20 --tables methods curve
"""
from __future__ import annotations

import argparse
import time

import lowbit
from lowbit.evaluate import accuracy

from common import add_data_args, mean_spread, add_method_option_arg, load_data, method_options, table, write_section, parse_args

TABLES = ("granularity", "ablation", "methods", "curve")
GRANULARITIES = [("per-channel", {"granularity": "channel"}), ("per-layer", {"granularity": "tensor"}),
                 ("equalization + per-layer", {"granularity": "tensor", "equalize": True})]
GRANULARITIES += [(f"{g} groups", {"granularity": "group", "groups": g}) for g in (2, 4, 8, 16)]
METHODS = ["minmax", "mse", "bitsplit", "brecq", "qdrop", "distill"]


def parse_config(text: str) -> tuple[int, int | None]:
    w, _, a = text.upper().lstrip("W").partition("A")
    return int(w), (int(a) if a else None)


def run(fp, calib, x, y, w, a, method, **opts) -> tuple[float, float]:
    if method != "bitsplit":
        opts.setdefault("w_symmetric", False)
    t = time.perf_counter()
    q = lowbit.quantize(fp, calib, w_bits=w, a_bits=a, method=method, progress=False, **opts)
    secs = time.perf_counter() - t
    return accuracy(q, x, y), secs


def granularity_table(name, fp, fp_acc, calib, x, y) -> str:
    bits = [8, 6, 4, 3]  # the seed's W8, W6, W4, and W3 below it
    rows = []
    for label, opts in GRANULARITIES:
        for method in ("minmax", "mse"):
            rows.append([label, method] + [run(fp, calib, x, y, b, None, method, **opts)[0] for b in bits])
            print(rows[-1], flush=True)
    head = f"### {name}: weights-only, group-wise scales (FP {fp_acc:.2f})\n\n"
    return head + table(["scales", "init"] + [f"W{b}" for b in bits], rows)


def ablation_table(name, fp, fp_acc, calib, x, y, config, opts) -> str:
    w, a = parse_config(config)
    variants = [("init (MSE)", "mse", {}), ("global only", "distill", {"block_iters": 0}),
                ("block-wise only", "distill", {"joint_iters": 0}), ("both (two-stage)", "distill", {})]
    rows = []
    for label, method, extra in variants:
        row = [label]
        for gran in ({"granularity": "channel"}, {"granularity": "group", "groups": 8}):
            acc, secs = run(fp, calib, x, y, w, a, method, **gran, **extra, **(opts if method == "distill" else {}))
            row += [acc, f"{secs:.0f}"]
        rows.append(row)
        print(rows[-1], flush=True)
    head = (f"### {name}: two-stage distillation ablation at {config} (FP {fp_acc:.2f}), "
            f"options {opts or 'default'}\n\n")
    return head + table(["supervision", "per-channel", "s", "8 groups", "s"], rows)


def methods_table(name, fp, fp_acc, calib, x, y, configs, methods, opts, seeds=(0,)) -> str:
    """Top-1, drop and seconds per method and config; with several ``seeds`` (calibration sample and
    method seed both), each cell is mean +- sample standard deviation over them."""
    from lowbit.data import load_fashion_mnist, sample_calibration

    if list(seeds) == [0]:
        calibs = {0: calib}
    else:
        x_train = load_fashion_mnist("train")[0]  # read once, sampled once per seed
        calibs = {s: sample_calibration(x_train, len(calib), seed=s) for s in seeds}
    rows = []
    for method in methods:
        row = [method]
        for config in configs:
            w, a = parse_config(config)
            accs, times = [], []
            for s in seeds:
                extra = {"seed": s} if len(seeds) > 1 else {}
                acc, secs = run(fp, calibs[s], x, y, w, a, method, **{**opts.get(method, {}), **extra})
                accs.append(acc)
                times.append(secs)
            row += [mean_spread(accs), mean_spread([fp_acc - v for v in accs]), f"{sum(times) / len(times):.0f}"]
        rows.append(row)
        print(rows[-1], flush=True)
    over = f"; mean +- std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    head = (f"### {name}: methods (FP {fp_acc:.2f} on {len(x)} test images; {len(calib)} calibration images; "
            f"scales per channel unless the options set a granularity; options {opts or 'default'}{over})\n\n")
    cols = ["method"] + [c for config in configs for c in (config, "drop", "s")]
    return head + table(cols, rows)


def curve_table(name, fp, fp_acc, calib, x, y, config, method, iters_list, sizes, opts) -> str:
    w, a = parse_config(config)
    rows = []
    for iters in iters_list:
        # distillation: the joint stage gets three times the block-wise steps, as in the defaults
        steps = {"block_iters": iters, "joint_iters": 3 * iters} if method == "distill" else {"iters": iters}
        acc, secs = run(fp, calib, x, y, w, a, method, **{**opts, **steps})
        rows.append([", ".join(f"{k}={v}" for k, v in steps.items()), len(calib), acc, fp_acc - acc, f"{secs:.0f}"])
        print(rows[-1], flush=True)
    for n in sizes:
        acc, secs = run(fp, calib[:n], x, y, w, a, method, **opts)
        rows.append(["default", n, acc, fp_acc - acc, f"{secs:.0f}"])
        print(rows[-1], flush=True)
    head = f"### {name}: {method} at {config} against iterations and images (FP {fp_acc:.2f})\n\n"
    return head + table(["setting", "images", "top-1", "drop", "s"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    ap.add_argument("--configs", nargs="+", default=["W4A4", "W2A4"])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--ablation-config", default="W4A4")
    ap.add_argument("--curve-method", default="qdrop")
    ap.add_argument("--curve-config", default="W2A4")
    ap.add_argument("--curve-iters", nargs="+", type=int, default=[100, 250, 500, 1000])
    ap.add_argument("--curve-sizes", nargs="*", type=int, default=[256, 64], help="image counts (none: skip)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="methods table: calibration-sample and method seeds; cells become mean +- std")
    ap.add_argument("--tag", default="", help="suffix of the RESULTS.md section names (keeps other runs)")
    add_method_option_arg(ap)
    args = parse_args(ap)
    opts = method_options(args.option)
    calib, x, y = load_data(args)
    for name in args.models:
        fp = lowbit.load_pretrained(name)
        fp_acc = accuracy(fp, x, y)
        print(f"{name}: FP {fp_acc:.2f}", flush=True)
        sections = {
            "granularity": lambda: granularity_table(name, fp, fp_acc, calib, x, y),
            "ablation": lambda: ablation_table(name, fp, fp_acc, calib, x, y, args.ablation_config,
                                               opts.get("distill", {})),
            "methods": lambda: methods_table(name, fp, fp_acc, calib, x, y, args.configs, args.methods, opts,
                                             args.seeds),
            "curve": lambda: curve_table(name, fp, fp_acc, calib, x, y, args.curve_config, args.curve_method,
                                         args.curve_iters, args.curve_sizes, opts.get(args.curve_method, {})),
        }
        for t in args.tables:
            body = sections[t]()
            print(body, flush=True)
            if not args.no_write:
                write_section(f"limited-{name}-{t}" + (f"-{args.tag}" if args.tag else ""), body, [name])


if __name__ == "__main__":
    main()
