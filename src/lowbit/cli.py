"""The ``lowbit`` command line: train, quantize, eval, export, methods, models."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .errors import LowbitError


def _bits(text: str) -> int | None:
    if text.lower() in ("fp", "float", "none", "32"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer 1..16 or 'fp', got {text!r}") from None


def parse_option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` -> (name, value), the value read as JSON when it is JSON (numbers, true, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _emit(args: argparse.Namespace, result: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))


def _load_fp_model(args: argparse.Namespace):
    from .models import create_model, load_pretrained

    if args.weights:
        from safetensors.torch import load_file
        model = create_model(args.model, **json.loads(args.model_kwargs or "{}"))
        model.load_state_dict(load_file(args.weights))
        return model.eval()
    return load_pretrained(args.model)


def _data(args: argparse.Namespace, split: str):
    from .data import load_fashion_mnist, load_image_folder

    folder = args.calib_dir if split == "train" else args.eval_dir
    if folder:
        x, y, _ = load_image_folder(folder)
        return x, y
    return load_fashion_mnist(split, args.data)


def _eval_subset(x, y, limit: int | None):
    return (x[:limit], y[:limit]) if limit else (x, y)


def cmd_methods(args: argparse.Namespace) -> int:
    from .ptq.registry import method_table
    from .qat.registry import get_qat_method, qat_methods

    table = [{**m, "kind": "ptq"} for m in method_table()]
    table += [{"name": n, "description": get_qat_method(n).description, "kind": "qat"} for n in qat_methods()]
    _emit(args, {"methods": table},
          [f"{m['name']:<12} {m['kind'].upper():<4} {m['description']}" for m in table])
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models
    from .models.zoo import available, pretrained_info

    rows = []
    for name in list_models():
        acc = pretrained_info(name).get("test_accuracy") if name in available() else None
        rows.append({"name": name, "pretrained_fmnist_top1": acc})
    _emit(args, {"models": rows},
          [f"{r['name']:<14} {'trained: %.2f%%' % r['pretrained_fmnist_top1'] if r['pretrained_fmnist_top1'] else 'no checkpoint'}"
           for r in rows])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train_zoo_model

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      seed=args.seed, device=args.device, kd_weight=args.kd if args.teacher else 0.0,
                      kd_temperature=args.kd_temperature, swa_epochs=args.swa_epochs, swa_lr=args.swa_lr)
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    kwargs = json.loads(args.model_kwargs or "{}")
    _, result = train_zoo_model(args.model, cfg, args.data, save=not args.no_save, progress=_progress(args),
                                log=log, resume=args.resume, teachers=tuple(args.teacher or ()),
                                checkpoint=args.checkpoint, stop_after=args.stop_after, **kwargs)
    if not result.finished:
        _emit(args, {"model": args.model, "finished": False, "history": result.history},
              [f"{args.model}: stopped after epoch {len(result.history)}/{cfg.epochs}; "
               f"the same command continues from {args.checkpoint}"])
        return 0
    _emit(args, {"model": args.model, "test_accuracy": result.test_accuracy, "history": result.history},
          [f"{args.model}: test accuracy {result.test_accuracy:.2f}%"])
    return 0


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """--option pairs plus --granularity / --groups."""
    options = dict(args.option or [])
    if args.granularity:
        options["granularity"] = args.granularity
    if args.groups:
        options.setdefault("granularity", "group")
        options["groups"] = args.groups
    return options


def _quantize_from_args(args: argparse.Namespace):
    import torch

    import lowbit
    from .data import sample_calibration

    fp = _load_fp_model(args)
    x_train, _ = _data(args, "train")
    calib = sample_calibration(x_train, min(args.calib_size, len(x_train)), args.seed)
    options = _method_options(args)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    qmodel = lowbit.quantize(fp, calib, w_bits=args.w_bits, a_bits=args.a_bits, method=args.method,
                             calib_size=args.calib_size, seed=args.seed, device=args.device,
                             quantize_all=args.quantize_all, equalize=args.equalize, fold_bn=not args.no_fold,
                             progress=_progress(args), **options)
    return fp, qmodel, time.perf_counter() - start


def _report(args: argparse.Namespace, fp, qmodel, seconds: float, evaluate: bool) -> int:
    from .evaluate import timed_accuracy
    from .deploy.size import size_report

    import lowbit

    result: dict[str, Any] = {"model": args.model, "method": args.method, "w_bits": args.w_bits,
                              "a_bits": args.a_bits, "calib_size": args.calib_size,
                              "quantize_seconds": round(seconds, 2), **size_report(fp, qmodel)}
    a_txt = "fp" if args.a_bits is None else args.a_bits
    lines = [f"{args.model} W{args.w_bits}A{a_txt} method={args.method}  quantized in {seconds:.1f}s"]
    if evaluate:
        x, y = _eval_subset(*_data(args, "test"), args.eval_size)
        fp_acc, fp_t = timed_accuracy(fp.to(args.device), x, y, device=args.device)
        q_acc, q_t = timed_accuracy(qmodel, x, y, device=args.device)
        result.update(fp_top1=round(fp_acc, 2), quant_top1=round(q_acc, 2), drop=round(fp_acc - q_acc, 2),
                      eval_images=len(x), fp_eval_seconds=round(fp_t, 2), quant_eval_seconds=round(q_t, 2))
        lines += [f"  top-1 on {len(x)} test images: FP {fp_acc:.2f}%  quantized {q_acc:.2f}%  (drop {fp_acc - q_acc:.2f} points)",
                  f"  eval time: FP {fp_t:.2f}s  simulated-quantized {q_t:.2f}s"]
    lines.append(f"  size: FP32 {result['fp32_mb']:.3f} MB -> quantized {result['quantized_mb']:.3f} MB "
                 f"({result['compression']:.1f}x)")
    if args.out:
        path = lowbit.export(qmodel, args.out)
        result.update(artifact=str(path), artifact_mb=path.stat().st_size / 2 ** 20)
        lines.append(f"  wrote {path} ({result['artifact_mb']:.3f} MB)")
    _emit(args, result, lines)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    fp, qmodel, seconds = _quantize_from_args(args)
    return _report(args, fp, qmodel, seconds, evaluate=not args.no_eval)


def cmd_export(args: argparse.Namespace) -> int:
    fp, qmodel, seconds = _quantize_from_args(args)
    return _report(args, fp, qmodel, seconds, evaluate=args.eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import lowbit
    from .evaluate import timed_accuracy

    onnx_path = args.onnx or (args.artifact if args.artifact and args.artifact.endswith(".onnx") else None)
    if onnx_path:
        from .deploy.onnx_qdq import onnx_accuracy

        x, y = _eval_subset(*_data(args, "test"), args.eval_size)
        acc, seconds = onnx_accuracy(onnx_path, x, y)
        _emit(args, {"model": onnx_path, "runtime": "onnxruntime", "top1": round(acc, 2), "images": len(x),
                     "seconds": round(seconds, 2)},
              [f"{onnx_path} (ONNX Runtime, CPU): top-1 {acc:.2f}% on {len(x)} images ({seconds:.2f}s)"])
        return 0
    if args.artifact:
        model = lowbit.load(args.artifact, device=args.device)
        what = args.artifact
    elif args.model:
        model, what = _load_fp_model(args), f"{args.model} (FP)"
    else:
        raise LowbitError("eval needs an artifact path or --model NAME")
    x, y = _eval_subset(*_data(args, "test"), args.eval_size)
    acc, seconds = timed_accuracy(model, x, y, device=args.device)
    _emit(args, {"model": what, "top1": round(acc, 2), "images": len(x), "seconds": round(seconds, 2)},
          [f"{what}: top-1 {acc:.2f}% on {len(x)} images ({seconds:.2f}s)"])
    return 0


def cmd_qat(args: argparse.Namespace) -> int:
    import os

    import lowbit
    from .evaluate import accuracy

    fp = _load_fp_model(args)
    x_train, y_train = _data(args, "train")
    if args.train_size:
        x_train, y_train = x_train[:args.train_size], y_train[:args.train_size]
    x_test, y_test = _eval_subset(*_data(args, "test"), args.eval_size)
    main_process = os.environ.get("RANK", "0") == "0"
    log = (lambda s: print(s, file=sys.stderr)) if args.json or not main_process else print
    options = _method_options(args)
    train = {k: v for k, v in (("lr", args.lr), ("scale_lr", args.scale_lr), ("optimizer", args.optimizer),
                               ("batch_size", args.batch_size), ("checkpoint", args.checkpoint),
                               ("log_dir", args.log_dir), ("max_steps", args.max_steps),
                               ("kd_weight", args.kd), ("kd_temperature", args.kd_temperature)) if v is not None}
    start = time.perf_counter()
    qmodel = lowbit.qat(fp, (x_train, y_train), (x_test, y_test), method=args.method, w_bits=args.w_bits,
                        a_bits=args.a_bits, epochs=args.epochs, resume=args.resume, seed=args.seed,
                        device=args.device, quantize_all=args.quantize_all, progress=_progress(args), log=log,
                        calib_size=args.calib_size, equalize=args.equalize,
                        **({"fold_bn": False} if args.no_fold else {}), **train, **options)
    seconds = time.perf_counter() - start
    if not main_process:
        return 0
    summary = getattr(qmodel, "lowbit_qat", None) or qmodel.lowbit_info["qat"]
    result: dict[str, Any] = {"model": args.model, "method": args.method, "w_bits": args.w_bits,
                              "a_bits": args.a_bits, "seconds": round(seconds, 1), "finished": summary["finished"],
                              "steps": summary["steps"], "history": summary["history"]}
    lines = [f"{args.model} W{args.w_bits}A{args.a_bits or 'fp'} QAT method={args.method}: "
             f"{summary['steps']}/{summary['total_steps']} steps in {seconds:.0f}s"]
    if not summary["finished"]:
        lines.append(f"  stopped early (--max-steps); continue with --resume --checkpoint {args.checkpoint}")
        _emit(args, result, lines)
        return 0
    fp_acc = accuracy(fp.to(args.device), x_test, y_test, device=args.device)
    q_acc = accuracy(qmodel, x_test, y_test, device=args.device)
    result.update(fp_top1=round(fp_acc, 2), quant_top1=round(q_acc, 2), drop=round(fp_acc - q_acc, 2),
                  eval_images=len(x_test))
    lines.append(f"  top-1 on {len(x_test)} test images: FP {fp_acc:.2f}%  quantized {q_acc:.2f}%  "
                 f"(drop {fp_acc - q_acc:.2f} points)")
    if args.out:
        path = lowbit.export(qmodel, args.out)
        result["artifact"] = str(path)
        lines.append(f"  wrote {path}")
    _emit(args, result, lines)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--data", help="Fashion-MNIST folder (default: $LOWBIT_FASHION_MNIST or Debian's path)")
    p.add_argument("--eval-dir", help="evaluate on an image folder (class sub-folders) instead")
    p.add_argument("--eval-size", type=int, help="evaluate on the first N test images only")


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="zoo model name (see `lowbit models`)")
    p.add_argument("--weights", help="safetensors state dict for --model (default: the shipped checkpoint)")
    p.add_argument("--model-kwargs", help="JSON constructor arguments for --model with --weights")


def _quant_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=_bits, default=4, help="activation bits, or 'fp' for weights only")
    p.add_argument("--method", default="minmax", help="see `lowbit methods`")
    p.add_argument("--granularity", choices=["tensor", "channel", "group"])
    p.add_argument("--groups", type=int, help="G groups of output channels (implies --granularity group)")
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--calib-dir", help="calibrate on an image folder instead of Fashion-MNIST train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize-all", action="store_true",
                   help="no 8-bit first/last layers, quantize the network input too")
    p.add_argument("--equalize", action="store_true", help="cross-layer equalization first")
    p.add_argument("--no-fold", action="store_true", help="keep BatchNorm unfolded")
    p.add_argument("--option", action="append", type=parse_option, metavar="NAME=VALUE",
                   help="method option (repeatable), e.g. --option p_act=2.4")
    p.add_argument("--out", help="write the artifact here (.lowbit safetensors, or .onnx)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit quantization of PyTorch CNNs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list quantization methods")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("models", help="list zoo models and their trained checkpoints")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("train", help="train a zoo model on Fashion-MNIST (stores the checkpoint)")
    p.add_argument("model")
    p.add_argument("--model-kwargs", help="JSON constructor arguments")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true", help="do not overwrite the shipped checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="start from the shipped checkpoint (fine-tune with a fresh schedule)")
    p.add_argument("--teacher", nargs="+", metavar="MODEL",
                   help="distil from these shipped zoo checkpoints (their averaged predictions)")
    p.add_argument("--kd", type=float, default=1.0, metavar="WEIGHT",
                   help="with --teacher: weight of the distillation loss (1: soft targets only)")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--swa-epochs", type=int, default=0, metavar="N",
                   help="average the weights of the last N epochs, run at the constant --swa-lr (SWA)")
    p.add_argument("--swa-lr", type=float, default=0.01)
    p.add_argument("--checkpoint", metavar="PATH",
                   help="training state after every epoch; the same command continues from it when it exists")
    p.add_argument("--stop-after", type=int, metavar="N", help="with --checkpoint: stop after N epochs of this run")
    _common(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("quantize", help="quantize a model and report FP vs quantized accuracy, size, time")
    _quant_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation")
    _common(p)
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("export", help="quantize a model and write its artifact (--out required)")
    _quant_args(p)
    p.add_argument("--eval", action="store_true", help="also evaluate accuracy")
    _common(p)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("qat", help="quantization-aware fine-tuning (lsq, gdrq); torchrun for several processes")
    _quant_args(p)
    p.set_defaults(method="lsq")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--scale-lr", type=float, help="learning rate of step sizes (default: --lr)")
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--train-size", type=int, help="first N training images only")
    p.add_argument("--checkpoint", help="checkpoint file (written periodically, atomically)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--max-steps", type=int, help="stop after N steps in this run (resume later)")
    p.add_argument("--log-dir", help="per-epoch CSV/JSON log and training-curve PNG")
    p.add_argument("--kd", type=float, metavar="WEIGHT",
                   help="distil from the FP model: weight of KL to its logits (1: pure KD, default 0)")
    p.add_argument("--kd-temperature", type=float)
    _common(p)
    p.set_defaults(func=cmd_qat)
    p = sub.add_parser("eval", help="accuracy of an artifact or a zoo FP model")
    p.add_argument("artifact", nargs="?", help="a .lowbit artifact (or an .onnx file)")
    p.add_argument("--onnx", metavar="FILE", help="evaluate an ONNX model in ONNX Runtime (CPU)")
    _model_args(p, required=False)
    _common(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "export" and not args.out:
        parser.error("export needs --out PATH")
    try:
        return args.func(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
