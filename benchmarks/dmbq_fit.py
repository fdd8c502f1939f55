"""DMBQ alphas on real tensors: table lookup vs per-tensor solve vs LQ-Net-style alternating fit.

Zoo ResNet-20 (Fashion-MNIST): every body conv's weights per output channel (sign bases) and its
input per tensor (64 training images; {0,1} bases after ReLU), at 1 to 4 bases. For each
method: the MSE relative to the table's and the time to compute the alphas.

* table: ``dmbq_table`` lookup from the tensor's (E|x|/rms, max|x|/rms), scaled by its RMS;
* solve: alternating fit to convergence on the tensor (start: the table);
* lqnet-1 / lqnet-10: LQ-Net's fit from its power-of-two start (a uniform grid at max|x|):
  1 and 10 alternating steps (LQ-Net takes one per training iteration, so "1" is its per-step
  quality and cost, "10" what several iterations reach on a tensor that stays put).

Run: PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/dmbq_fit.py
"""
from __future__ import annotations

import argparse
import time

import torch

import lowbit
from lowbit.data import load_fashion_mnist, sample_calibration
from lowbit.quant import dmbq
from lowbit.quant.dmbq_table import table_alphas

from common import parse_args, table, write_section


def tensors(images: int) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, rows, signed) for every body conv's weight (C x n) and its input (1 x N)."""
    model = lowbit.load_pretrained("resnet20").eval()
    x_train, _ = load_fashion_mnist("train")
    calib = sample_calibration(x_train, images, 0)
    inputs: dict[str, torch.Tensor] = {}
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)][1:]  # not the stem
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach().reshape(1, -1)))
             for n, m in convs]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    out = []
    for n, m in convs:
        out.append((f"{n}.weight", m.weight.detach().reshape(m.out_channels, -1), True))
        act = inputs[n]
        out.append((f"{n}.input", act, bool(act.min() < 0)))
    return out


def lqnet(x: torch.Tensor, m: int, signed: bool, steps: int) -> torch.Tensor:
    top = x.abs().amax(1) if signed else x.amax(1)
    alpha = dmbq.uniform_alphas(top, m, signed)
    for _ in range(steps):
        alpha = dmbq.alternate_step(x, None, alpha, signed)
    return alpha


METHODS = {
    "table": lambda x, m, s: table_alphas(x, m, s),
    "solve": lambda x, m, s: dmbq.fit_alphas(x, m, s, init=table_alphas(x, m, s), max_iters=100, tol=1e-6),
    "lqnet-1": lambda x, m, s: lqnet(x, m, s, 1),
    "lqnet-10": lambda x, m, s: lqnet(x, m, s, 10),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = parse_args(ap)
    torch.set_num_threads(1)
    data = tensors(args.images)
    rows = []
    for kind in ("weight", "input"):
        for m in range(1, dmbq.MAX_BASES + 1):
            err = {k: 0.0 for k in METHODS}
            secs = {k: 0.0 for k in METHODS}
            energy = 0.0
            for name, x, signed in data:
                if not name.endswith(kind):
                    continue
                energy += float(x.pow(2).sum())
                for k, fn in METHODS.items():
                    t = time.perf_counter()
                    alpha = fn(x, m, signed)
                    secs[k] += time.perf_counter() - t
                    q, _ = dmbq.assign(x, alpha.to(x.dtype), signed)
                    err[k] += float((x - q).pow(2).sum())
            rows.append([f"{kind}s ({'per channel' if kind == 'weight' else 'per tensor'})", m]
                        + [f"{err[k] / energy:.4f}" for k in METHODS] + [f"{1e3 * secs[k]:.1f}" for k in METHODS])
            print(rows[-1], flush=True)
    header = (["tensors", "bases"] + [f"rel. MSE {k}" for k in METHODS] + [f"ms {k}" for k in METHODS])
    body = (f"### DMBQ alphas on zoo ResNet-20 tensors: table vs per-tensor solve vs LQ-Net fit\n\n"
            f"Relative MSE = sum (x - Q(x))^2 / sum x^2 over all 18 body convs' weights (per output channel, "
            f"sign bases) or inputs ({args.images} training images, per tensor; {{0,1}} bases for the "
            f"non-negative ones). ms = total time to choose the alphas for all 18 tensors, one thread. "
            f"**The machine was shared with other jobs (2 cores, several processes): timings are indicative "
            f"only.** lqnet-k: k alternating steps from LQ-Net's power-of-two start.\n\n"
            + table(header, rows))
    print(body)
    if not args.no_write:
        write_section("dmbq-fit", body, ["resnet20"])


if __name__ == "__main__":
    main()
