"""Sensitivity and allocation timing on the zoo ResNet-20 (Fashion-MNIST, 256 calibration images).

Run: PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sensitivity_resnet20.py
"""
from __future__ import annotations

import json
import time

import torch

import lowbit
from lowbit.allocate import average_bits
from lowbit.data import load_fashion_mnist, sample_calibration
from lowbit.sensitivity import spearman

torch.set_num_threads(1)
model = lowbit.load_pretrained("resnet20")
x_train, _ = load_fashion_mnist("train")
calib = sample_calibration(x_train, 256, 0)
out: dict = {"threads": torch.get_num_threads(), "images": len(calib)}
reports = {}
for metric in ("kl", "taylor"):
    r = lowbit.sensitivity(model, calib, bits=(2, 3, 4, 8), target="weights", metric=metric)
    reports[metric] = r
    out[f"{metric}_seconds"] = round(r.seconds, 2)
    out[f"{metric}_top5_2bit"] = r.ranking(2)[:5]
kl, ty = reports["kl"], reports["taylor"]
for b in (2, 3, 4, 8):
    out[f"spearman_taylor_kl_{b}bit"] = round(spearman({n: ty.scores[n][b] for n in ty.scores},
                                                        {n: kl.scores[n][b] for n in kl.scores}), 3)
    per = ty.extra["taylor_per_element"]
    out[f"spearman_lba_per_element_kl_{b}bit"] = round(spearman({n: per[n][b] for n in per},
                                                                 {n: kl.scores[n][b] for n in kl.scores}), 3)
for metric, r in reports.items():
    for avg in (2.5, 3.0):
        for solver in ("dp", "greedy"):
            t = time.perf_counter()
            m = lowbit.allocate_bits(report=r, avg_w_bits=avg, candidates=(1, 2, 3, 4, 8), solver=solver)
            secs = time.perf_counter() - t
            # judge every map by the KL table (additive proxy of the true loss)
            kl_sum = sum(kl.scores[n][b] for n, b in m.items() if b in kl.bits)
            out[f"alloc_{metric}_{solver}_{avg}"] = {"seconds": round(secs, 4), "avg_bits": round(average_bits(m, r.params), 4),
                                                     "sum_kl": round(kl_sum, 5), "map": m}
print(json.dumps(out, indent=1))
print(kl.to_markdown())
print(ty.to_markdown())
