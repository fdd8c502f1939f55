"""The offline DMBQ table: optimal alphas for a grid of distribution shapes, and its lookup.

Regenerate the shipped file (``dmbq_table.json`` beside this module) with::

    python -m lowbit.quant.dmbq_table            # writes src/lowbit/quant/dmbq_table.json
    python -m lowbit.quant.dmbq_table --out FILE

Grid: generalized Gaussian shape ``beta`` (``f ~ exp(-|x|^beta)``; 0.5 is far heavier-tailed than
Laplace (1), 2 is Gaussian, 10 close to uniform) times the truncation ``c = max|x| / rms`` of the
truncated density. At every node and for ``M = 1..4`` bases, signed (``b in {-1, 1}``, fitted to
``|x|``) and unsigned (``b in {0, 1}``, fitted to the positive part), ``dmbq.fit_alphas`` solves the
expected-error problem on a 4001-point quadrature to convergence from several starts. Alphas are
stored in units of the node's RMS together with the node's measured ``r = E|x| / rms``.

Lookup (``lookup``): along ``c`` linearly; then, at that ``c``, the ``beta`` whose ``r`` matches the
tensor's (``r`` rises with ``beta``), linearly; alphas interpolated bilinearly and scaled by the
tensor's RMS. Statistics outside the grid are clamped to its edge.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from . import dmbq

TABLE_PATH = Path(__file__).with_name("dmbq_table.json")
BETAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.7, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0)
CLIPS = (1.8, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0, 24.0)
STARTS = (0.5, 1.0)  # top level of the uniform start grids, in units of the truncation
TOPS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)  # and in units of the RMS (heavy tails, c >> top)
RANDOM_STARTS = 6  # plus random alpha directions (fixed seed) at top levels 1.5 and 3 RMS: the
# alternating fit keeps the level structure it starts in (e.g. alpha_1 > alpha_2 + alpha_3 or not)
QUADRATURE = 4001
FORMAT = "lowbit-dmbq-table-1"


def build_table(betas: tuple[float, ...] = BETAS, clips: tuple[float, ...] = CLIPS, n: int = QUADRATURE,
                log=print, bases: tuple[int, ...] = tuple(range(1, dmbq.MAX_BASES + 1))) -> dict:
    """Solve every node (see the module docstring); returns the JSON-ready table."""
    xs, ws, r, c_meas = [], [], [], []
    for beta in betas:
        for c in clips:
            t = dmbq.gg_truncation(beta, c, n)
            x, w = dmbq.gg_quadrature(beta, t, n)
            ri, ci, rms = dmbq.truncated_stats(x, w)
            xs.append(x / rms)  # unit RMS: alphas come out in RMS units
            ws.append(w)
            r.append(ri)
            c_meas.append(ci)
    x, w = torch.stack(xs), torch.stack(ws)
    table: dict = {"format": FORMAT, "betas": list(betas), "clips": list(clips), "quadrature": n,
                   "r": [[round(v, 7) for v in r[i * len(clips):(i + 1) * len(clips)]] for i in range(len(betas))],
                   "c": [[round(v, 5) for v in c_meas[i * len(clips):(i + 1) * len(clips)]] for i in range(len(betas))],
                   "alpha": {}, "mse": {}}
    for kind, signed in (("signed", True), ("unsigned", False)):
        for m in bases:
            start = time.perf_counter()
            gen = torch.Generator().manual_seed(m)
            inits = [dmbq.uniform_alphas(torch.minimum(x.amax(1), torch.full_like(x[:, 0], t)), m, signed)
                     for t in TOPS]
            inits += [dmbq.uniform_alphas(x.amax(1) * s, m, signed) for s in STARTS]
            for _ in range(RANDOM_STARTS):
                d = torch.rand(m, generator=gen, dtype=x.dtype) + 0.05
                for top in (1.5, 3.0):
                    inits.append((d / d.sum() * top).expand(len(x), m).clone())
            alpha = dmbq.fit_alphas(x, m, signed, weight=w, init=inits, max_iters=400, tol=1e-8)
            err = dmbq.weighted_mse(x, w, alpha, signed)
            shape = (len(betas), len(clips))
            table["alpha"][f"{kind}{m}"] = [[[round(float(a), 7) for a in alpha[i * shape[1] + j]]
                                             for j in range(shape[1])] for i in range(shape[0])]
            table["mse"][f"{kind}{m}"] = [[float(f"{float(err[i * shape[1] + j]):.6g}") for j in range(shape[1])]
                                          for i in range(shape[0])]
            log(f"{kind} M={m}: {time.perf_counter() - start:.1f} s")
    return table


class Table:
    """The loaded table as tensors (float32), moved to a device on demand."""

    def __init__(self, data: dict) -> None:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} table")
        self.betas = torch.tensor(data["betas"], dtype=torch.float64)
        self.clips = torch.tensor(data["clips"], dtype=torch.float64)
        r = torch.tensor(data["r"], dtype=torch.float64)  # (B, C)
        # r rises with beta at every c; at small c all shapes look uniform and the rows meet, so
        # make the columns strictly increasing (searchsorted needs it) without moving them visibly
        eps = 1e-9 * torch.arange(len(self.betas), dtype=torch.float64).unsqueeze(1)
        self.r = torch.cummax(r, dim=0).values + eps
        self.alpha = {k: torch.tensor(v, dtype=torch.float64) for k, v in data["alpha"].items()}  # (B, C, m)
        self.mse = {k: torch.tensor(v, dtype=torch.float64) for k, v in data["mse"].items()}
        self._cache: dict = {}

    def _on(self, device: torch.device, dtype: torch.dtype, key: str) -> tuple[Tensor, Tensor, Tensor]:
        k = (device, dtype, key)
        if k not in self._cache:
            self._cache[k] = (self.clips.to(device, dtype), self.r.to(device, dtype),
                              self.alpha[key].to(device, dtype))
        return self._cache[k]

    def lookup(self, r: Tensor, c: Tensor, m: int, signed: bool) -> Tensor:
        """Alphas in RMS units for statistics ``r``, ``c`` (``(R,)`` each): ``(R, m)``."""
        key = f"{'signed' if signed else 'unsigned'}{m}"
        if key not in self.alpha:
            raise ValueError(f"the DMBQ table has no {key} entry (1 to {dmbq.MAX_BASES} bases)")
        clips, rt, alpha = self._on(r.device, r.dtype, key)
        nb, nc = rt.shape
        c = c.clamp(clips[0], clips[-1])
        hi = torch.searchsorted(clips, c.contiguous()).clamp(1, nc - 1)
        lo = hi - 1
        wc = ((c - clips[lo]) / (clips[hi] - clips[lo])).unsqueeze(1)  # (R, 1)
        r_rows = rt[:, lo].T * (1 - wc) + rt[:, hi].T * wc  # (R, B): r of every shape at this c
        r = torch.minimum(torch.maximum(r, r_rows[:, 0]), r_rows[:, -1]).unsqueeze(1)
        bh = torch.searchsorted(r_rows.contiguous(), r.contiguous()).clamp(1, nb - 1)  # (R, 1)
        bl = bh - 1
        rl, rh = r_rows.gather(1, bl), r_rows.gather(1, bh)
        wb = ((r - rl) / (rh - rl).clamp_min(1e-12)).clamp(0, 1)  # (R, 1)
        bl, bh = bl.squeeze(1), bh.squeeze(1)
        return ((1 - wb) * ((1 - wc) * alpha[bl, lo] + wc * alpha[bl, hi])
                + wb * ((1 - wc) * alpha[bh, lo] + wc * alpha[bh, hi]))


@lru_cache(maxsize=1)
def shipped_table() -> Table:
    """The table shipped with lowbit (``dmbq_table.json``)."""
    return Table(json.loads(TABLE_PATH.read_text()))


def table_alphas(x: Tensor, m: int, signed: bool, table: Table | None = None) -> Tensor:
    """DMBQ alphas of every row of ``x`` (``(R, n)``) from the table: ``(R, m)``, detached."""
    table = table or shipped_table()
    with torch.no_grad():
        r, c, rms = dmbq.shape_stats(x.detach(), signed)
        return table.lookup(r, c, m, signed) * rms.unsqueeze(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the DMBQ alpha table")
    parser.add_argument("--out", default=str(TABLE_PATH), help="where to write the JSON table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = build_table()
    Path(args.out).write_text(json.dumps(table, separators=(",", ":")) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
