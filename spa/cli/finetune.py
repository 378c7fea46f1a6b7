"""spa-prune finetune: fine-tune a (pruned) ONNX model, with distillation, into a model of the same interface."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import finetune as finetune_module
from ..driver import input_paths
from ..fileio import check_outputs
from ..options import check_counts, check_number, check_seed
from .common import add_memory_limit, python_warnings, write_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("finetune", formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="fine-tune (+ distillation) an ONNX model, same interface out",
                description="Fine-tune a (pruned) ONNX model on labelled and/or teacher-labelled data and write "
                            "an ONNX model with the same interface.",
                epilog=finetune_module.__doc__.split("\n\n", 2)[2])
    p.add_argument("input", help="the ONNX model to train (e.g. the output of spa-prune)")
    p.add_argument("output", help="where to write the fine-tuned ONNX model (replaced atomically)")
    p.add_argument("--data", required=True, metavar="FILE.npz|DIR",
                   help="training data: arrays keyed by input name, optional int 'labels' (or an image folder)")
    p.add_argument("--teacher", metavar="ONNX", help="distill from this model (usually the unpruned original)")
    p.add_argument("--val", metavar="FILE.npz|DIR", help="validation data, evaluated after every epoch")
    p.add_argument("--val-split", type=float, default=0.0, metavar="F",
                   help="hold out this fraction of --data (per class, seeded) as the validation data")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=None,
                   help="return the epoch (0 = the model as given) with the best validation accuracy or "
                        "agreement, ties to the lower validation loss (default: on with validation data)")
    p.add_argument("--epochs", type=int, default=5, help="passes over --data (default 5)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (cosine decay to 0; default 0.01)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step (default 64)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="SGD+Nesterov momentum, or AdamW")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default 5e-4)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--kd-alpha", type=float, help="weight of distillation vs cross-entropy (default 0.5)")
    p.add_argument("--kd-temperature", type=float, default=0.75, help="softmax temperature (default 0.75)")
    p.add_argument("--trainable", choices=["weights", "all"], default="weights",
                   help="which initializers train (default: weights and biases, not scalar constants)")
    p.add_argument("--no-batchnorm", action="store_true",
                   help="train without the temporary BatchNorm after each conv (see below)")
    p.add_argument("--seed", type=int, default=0, help="sample order and initialization (default 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--curve", metavar="PNG", help="loss/accuracy curve (default: OUTPUT with .curve.png)")
    p.add_argument("--no-curve", action="store_true", help="do not draw the curve")
    p.add_argument("--report", metavar="FILE", help="write a JSON report (history, settings, export check)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress and no summary")
    add_memory_limit(p)
    p.set_defaults(run=run)
    return p


def progress_printer(quiet: bool):
    """Epoch lines always (unless quiet); the in-epoch bar only on a terminal."""
    if quiet:
        return None
    tty = sys.stderr.isatty()

    def show(text: str, line: bool = False) -> None:
        if line:
            sys.stderr.write(("\r" + " " * 79 + "\r" if tty else "") + text + "\n")
        elif tty:
            sys.stderr.write("\r" + text[:79].ljust(79))
        sys.stderr.flush()

    return show


def run(args) -> int:
    check_counts([("--epochs", args.epochs)], minimum=0)
    check_counts([("--batch-size", args.batch_size), ("--threads", args.threads)])
    check_number("--lr", args.lr, low=0.0, low_open=True)
    check_number("--weight-decay", args.weight_decay, low=0.0)
    check_number("--momentum", args.momentum, low=0.0, high=1.0, high_open=True)
    check_number("--kd-alpha", args.kd_alpha, low=0.0, high=1.0)
    check_number("--kd-temperature", args.kd_temperature, low=0.0, low_open=True)
    check_number("--val-split", args.val_split, low=0.0, high=1.0, high_open=True)
    check_seed(args.seed)
    curve = None if args.no_curve else (args.curve or str(Path(args.output).with_suffix("")) + ".curve.png")
    check_outputs({"OUT": args.output, "--report": args.report, "--curve": curve},
                  input_paths(args.input, args.data, args.teacher, args.val))
    res = finetune_module.finetune(args.input, args.output, data=args.data, teacher=args.teacher, val=args.val,
                   epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                   weight_decay=args.weight_decay, momentum=args.momentum, kd_alpha=args.kd_alpha,
                   kd_temperature=args.kd_temperature, trainable=args.trainable, seed=args.seed,
                   batchnorm=not args.no_batchnorm, val_split=args.val_split, keep_best=args.keep_best,
                   curve=curve, progress=progress_printer(args.quiet), threads=args.threads)
    res.report["warnings"] = [*res.report.get("warnings", []), *python_warnings(args)]
    if args.report:
        write_json(res.report, args.report)
    if not args.quiet:
        h = res.history
        first, last = h[0], h[res.report["best_epoch"]]
        acc = [k for k in ("val_accuracy", "val_agreement", "train_accuracy") if k in last and k in first]
        line = f"fine-tuned {res.report['epochs']} epochs in {res.report['seconds']:.1f} s ({res.report['loss']})"
        if res.report["keep_best"]:
            line += f"; kept epoch {res.report['best_epoch']} (best on validation)"
        if acc:
            line += f"; {acc[0]} {first[acc[0]]:.4f} -> {last[acc[0]]:.4f}"
        line += (f"; checked in onnxruntime (max rel. error vs torch "
                 f"{res.report['export_check']['onnxruntime_vs_torch_max_rel_error']:.1e})")
        print(line, file=sys.stderr)
        if curve:
            print(f"curve: {curve}", file=sys.stderr)
        for w in res.report["warnings"][:5]:
            print(f"warning: {w}", file=sys.stderr)
    return 0
