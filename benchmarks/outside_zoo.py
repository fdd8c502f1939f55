"""Outside-zoo sweep: pytorchcv architectures (random weights) through lowbit, stage by stage.

For every architecture: minmax W8A8 and W4A4 quantization (seconds, top-1 agreement with the FP
model and cosine of logits), FP model untouched, ``.lowbit`` reload identical, and ONNX export with
ONNX Runtime agreement (argmax and cosine against the simulation). A failing stage is recorded
with its error and the sweep goes on. Needs ``pytorchcv`` (``pip install pytorchcv``)::

    python benchmarks/outside_zoo.py --no-write            # every architecture of tests/outside_zoo_models.py
    python benchmarks/outside_zoo.py --archs resnet10 dpn68 --eval-size 64 --no-write
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.outside_zoo_models

import lowbit  # noqa: E402
from lowbit.deploy.onnx_qdq import onnx_predict, onnx_session  # noqa: E402

from common import parse_args, table, write_section  # noqa: E402
from tests.outside_zoo_models import ARCHS, build, images  # noqa: E402

STAGES = ["quantize", "untouched", "reload", "onnx"]


def agreement(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean cosine of logits) of ``out`` with ``ref``."""
    top1 = (ref.argmax(1) == out.argmax(1)).float().mean().item()
    return top1, F.cosine_similarity(ref, out, dim=1).mean().item()


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__


def sweep_arch(name: str, calib: torch.Tensor, x: torch.Tensor, folder: Path) -> dict:
    """Every stage of one architecture; failures become ``row['errors'][stage]``."""
    row: dict = {"arch": name, "errors": {}, "passed": set()}
    try:
        fp = build(name)
    except Exception as exc:  # an architecture that cannot even be built at this size
        row["errors"]["build"] = _short(exc)
        return row
    row["params"] = sum(p.numel() for p in fp.parameters()) / 1e6
    before = {k: v.detach().clone() for k, v in fp.state_dict().items()}
    with torch.no_grad():
        ref = fp(x)
    for bits in (8, 4):
        tag = f"W{bits}A{bits}"
        try:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = lowbit.quantize(fp, calib, w_bits=bits, a_bits=bits, method="minmax")
            row[f"{tag} s"] = time.perf_counter() - start
            with torch.no_grad():
                sim = q(x)
            row[tag] = agreement(ref, sim)
            row["passed"].add(f"quantize {tag}")
        except Exception as exc:
            row["errors"][f"quantize {tag}"] = _short(exc)
            continue
        if bits == 8:
            after = fp.state_dict()
            if before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before):
                row["passed"].add("untouched")
            else:
                row["errors"]["untouched"] = "the FP model's state dict changed"
            try:
                path = lowbit.export(q, folder / f"{name}.lowbit")
                with torch.no_grad():
                    same = torch.equal(lowbit.load(path, model=fp)(x), sim)
                if same:
                    row["passed"].add("reload")
                else:
                    row["errors"]["reload"] = "reloaded outputs differ"
            except Exception as exc:
                row["errors"]["reload"] = _short(exc)
        try:
            path = folder / f"{name}_{tag}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lowbit.export(q, path)
            ort = onnx_predict(onnx_session(path), x)
            row[f"onnx {tag}"] = agreement(sim, ort)
            row["passed"].add(f"onnx {tag}")
        except Exception as exc:
            row["errors"][f"onnx {tag}"] = _short(exc)
    return row


def _pair(value: tuple[float, float] | None) -> str:
    return "—" if value is None else f"{value[0]:.0%} / {value[1]:.4f}"


def render(rows: list[dict], eval_size: int, calib_size: int) -> str:
    header = ["architecture", "params (M)", "quantize", "untouched", "reload", "ONNX", "W8A8 s",
              "W8A8 top-1 / cos", "W4A4 top-1 / cos", "ONNX vs sim W8A8", "ONNX vs sim W4A4"]
    body = []
    for r in rows:
        def ok(*stages: str) -> str:
            return "pass" if all(s in r["passed"] for s in stages) else "**fail**"
        body.append([r["arch"], f"{r.get('params', 0):.2f}", ok("quantize W8A8", "quantize W4A4"), ok("untouched"),
                     ok("reload"), ok("onnx W8A8", "onnx W4A4"), f"{r.get('W8A8 s', float('nan')):.2f}",
                     _pair(r.get("W8A8")), _pair(r.get("W4A4")), _pair(r.get("onnx W8A8")), _pair(r.get("onnx W4A4"))])
    passed = sum(not r["errors"] for r in rows)
    text = (f"### Outside model zoo (pytorchcv, random weights)\n\n"
            f"{passed}/{len(rows)} architectures pass every stage. Random weights, BN statistics measured on "
            f"random images, 3x32x32 inputs, {calib_size} calibration and {eval_size} evaluation images, minmax "
            f"calibration. Agreement columns: top-1 agreement / mean cosine of logits, against the FP model "
            f"(W8A8, W4A4) or the PyTorch simulation (ONNX Runtime).\n\n" + table(header, body))
    errors = [f"- {r['arch']} {stage}: {msg}" for r in rows for stage, msg in r["errors"].items()]
    if errors:
        text += "\n\nFailures:\n" + "\n".join(errors)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=sorted(ARCHS), choices=sorted(ARCHS), metavar="ARCH")
    ap.add_argument("--calib-size", type=int, default=8)
    ap.add_argument("--eval-size", type=int, default=32)
    ap.add_argument("--out", type=Path, help="also write the markdown table to this file")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parse_args(ap)
    torch.set_num_threads(1)
    calib, x = images(args.calib_size, seed=1), images(args.eval_size, seed=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            try:
                rows.append(sweep_arch(name, calib, x, Path(tmp)))
            except Exception:  # a bug in the sweep itself: show it, keep going
                traceback.print_exc()
                rows.append({"arch": name, "errors": {"sweep": "crashed"}, "passed": set()})
            r = rows[-1]
            print(f"{name}: {'ok' if not r['errors'] else r['errors']}", file=sys.stderr, flush=True)
    text = render(rows, args.eval_size, args.calib_size)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if not args.no_write:
        write_section("outside_zoo", text)


if __name__ == "__main__":
    main()
