"""Does a HAWQ-style Hessian-trace score rank ResNet-20's layers better than LBA's Taylor score,
against the measured KL? (Decides whether lowbit.sensitivity offers metric="hessian".)

Score per layer and width: Tr(H_W)/n * ||W - Q(W)||^2 (HAWQ-V2), H the Hessian of the mean KL to
the FP outputs w.r.t. the folded weights at the FP point, Tr by Hutchinson (Rademacher probes).
Run: PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/hessian_vs_kl.py
"""
from __future__ import annotations

import json
import time

import torch
from torch.nn import functional as F

import lowbit
from lowbit.config import build_config
from lowbit.data import load_fashion_mnist, sample_calibration
from lowbit.graph.surgery import prepare
from lowbit.quant.layers import quant_layers
from lowbit.quant.ranges import lp_search_range
from lowbit.sensitivity import spearman

torch.set_num_threads(1)
BITS = (2, 3, 4, 8)
PROBES = 16
model = lowbit.load_pretrained("resnet20")
x_train, _ = load_fashion_mnist("train")
calib = sample_calibration(x_train, 256, 0)
out: dict = {}
kl = lowbit.sensitivity(model, calib, bits=BITS, metric="kl")
ty = lowbit.sensitivity(model, calib, bits=BITS, metric="taylor")
out["kl_seconds"], out["taylor_seconds"] = round(kl.seconds, 1), round(ty.seconds, 1)

start = time.perf_counter()
cfg, _ = build_config(8, 8, {"first_last_bits": None})
qmodel, _ = prepare(model, cfg, calib[:2])
layers = dict(quant_layers(qmodel))
for l in layers.values():
    l.weight_quant.enabled = l.input_quant.enabled = False
names = [n for n in kl.order]
weights = [layers[n].weight for n in names]
for p in qmodel.parameters():
    p.requires_grad_(False)
for w in weights:
    w.requires_grad_(True)
gen = torch.Generator().manual_seed(0)
trace = {n: 0.0 for n in names}
with torch.no_grad():
    log_fp = F.log_softmax(qmodel(calib), 1)
for _ in range(PROBES):
    vs = [torch.randint(0, 2, w.shape, generator=gen).float() * 2 - 1 for w in weights]
    for i in range(0, len(calib), 128):
        logits = qmodel(calib[i:i + 128])
        lp = log_fp[i:i + 128]
        loss = (lp.exp() * (lp - F.log_softmax(logits, 1))).sum() / len(calib)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), weights)
        for n, h, v in zip(names, hv, vs):
            trace[n] += float((h * v).sum()) / PROBES
hessian = {}
for n, w in zip(names, weights):
    wq = layers[n].weight_quant
    hessian[n] = {}
    for b in BITS:
        wq.bits = b
        wq.calibrate(w.detach(), lp_search_range)
        wq.enabled = True
        delta = (wq(w.detach()) - w.detach()).pow(2).sum().item()
        wq.enabled = False
        hessian[n][b] = 0.5 * trace[n] / w.numel() * delta  # quadratic model of the KL change
out["hessian_seconds"] = round(time.perf_counter() - start, 1)
for b in BITS:
    truth = {n: kl.scores[n][b] for n in names}
    out[f"{b}bit"] = {"spearman_taylor": round(spearman({n: ty.scores[n][b] for n in names}, truth), 3),
                      "spearman_hessian": round(spearman({n: hessian[n][b] for n in names}, truth), 3),
                      "spearman_lba_per_element": round(spearman({n: ty.extra["taylor_per_element"][n][b]
                                                                  for n in names}, truth), 3)}
out["top5_2bit"] = {"kl": kl.ranking(2)[:5], "taylor": ty.ranking(2)[:5],
                    "hessian": sorted(names, key=lambda n: -hessian[n][2])[:5]}
# the allocation each metric gives, judged by the summed KL (the additive proxy)
for name, scores in (("kl", kl.scores), ("taylor", ty.scores), ("hessian", hessian)):
    rep = lowbit.SensitivityReport(metric=name, target="weights", bits=BITS, scores=scores, params=kl.params,
                                   out_channels=kl.out_channels, input_elements=kl.input_elements, order=kl.order)
    for avg in (2.5, 3.0):
        m = lowbit.allocate_bits(report=rep, avg_w_bits=avg)
        out[f"alloc_{name}_{avg}_sum_kl"] = round(sum(kl.scores[n][b] for n, b in m.items()), 4)
print(json.dumps(out, indent=1))
