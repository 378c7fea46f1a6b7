"""Pruning at any time, end to end with the spa-prune command line, on sklearn's digits (8x8, offline).

    python tools/example_anytime.py [--workdir DIR] [--epochs 8]

Three routes, each printed as the commands it runs, each ending in test accuracy measured in onnxruntime:

1. before training:  a freshly initialized network, exported to ONNX, pruned by SNIP on a labelled batch
   (`--importance snip --calib`), then trained from scratch with `spa-prune finetune` (no teacher).
2. after training, with fine-tuning:  the trained network pruned by l1 magnitude, then fine-tuned with
   distillation from the unpruned model (`spa-prune finetune --teacher`).
3. after training, without fine-tuning:  OBSPA scores + least-squares reconstruction on 128 calibration
   samples (`--importance obspa --calib`), nothing else.

The network (plain torch, defined here) is trained by this script only to have a "trained model" to start
routes 2 and 3 from; everything after the export uses the ONNX file alone.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build(seed: int):
    import torch
    from torch import nn
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def export(net, path: Path) -> None:
    import torch
    net.eval()
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17)


def data(workdir: Path) -> dict[str, Path]:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = ((d.images[:, None] / 16.0 - 0.5) / 0.5).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    tr, te = order[:1300], order[1300:]
    paths = {"train": workdir / "train.npz", "test": workdir / "test.npz", "calib": workdir / "calib.npz"}
    np.savez(paths["train"], input=x[tr], labels=y[tr])
    np.savez(paths["test"], input=x[te], labels=y[te])
    np.savez(paths["calib"], input=x[tr[:128]], labels=y[tr[:128]])
    return paths


def accuracy(model: Path, test: Path) -> float:
    import onnxruntime as ort
    d = np.load(test)
    out = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": d["input"]})[0]
    return float((out.argmax(1) == d["labels"]).mean())


def sh(*args) -> None:
    cmd = ["spa-prune", *map(str, args)]
    print("  $ " + shlex.join(cmd), flush=True)
    exe = Path(sys.executable).parent / "spa-prune"
    subprocess.run([str(exe), *map(str, args), "-q"], check=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where the files go (default: a temporary folder)")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs for route 1 (route 2 uses half)")
    ap.add_argument("--target-flops", type=float, default=0.5)
    args = ap.parse_args(argv)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory()
        args.workdir = Path(tmp.name)
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    files = data(w)
    flops = str(args.target_flops)
    results = {}

    print("1. before training: prune the freshly initialized network by SNIP, then train it")
    export(build(seed=1), w / "init.onnx")
    sh(w / "init.onnx", w / "init_pruned.onnx", "--target-flops", flops, "--importance", "snip",
       "--calib", files["calib"])
    sh("finetune", w / "init_pruned.onnx", w / "scratch.onnx", "--data", files["train"], "--epochs", args.epochs,
       "--lr", "0.1", "--batch-size", "32", "--no-curve")
    results["before training (snip, then train)"] = accuracy(w / "scratch.onnx", files["test"])

    # the "trained model" routes 2 and 3 start from (trained with the same command on the unpruned network)
    sh("finetune", w / "init.onnx", w / "trained.onnx", "--data", files["train"], "--epochs", args.epochs,
       "--lr", "0.1", "--batch-size", "32", "--no-curve")
    results["unpruned, trained"] = accuracy(w / "trained.onnx", files["test"])

    print("2. after training, with fine-tuning: prune by l1, fine-tune with distillation from the original")
    sh(w / "trained.onnx", w / "l1.onnx", "--target-flops", flops, "--importance", "l1", "--allocation", "uniform")
    results["after training, l1, no fine-tuning"] = accuracy(w / "l1.onnx", files["test"])
    sh("finetune", w / "l1.onnx", w / "l1_kd.onnx", "--data", files["train"], "--teacher", w / "trained.onnx",
       "--epochs", max(1, args.epochs // 2), "--lr", "0.05", "--batch-size", "32", "--no-curve")
    results["after training, l1 + KD fine-tuning"] = accuracy(w / "l1_kd.onnx", files["test"])

    print("3. after training, without fine-tuning: OBSPA scores and reconstruction on 128 samples")
    sh(w / "trained.onnx", w / "obspa.onnx", "--target-flops", flops, "--importance", "obspa", "--allocation",
       "uniform", "--calib", files["calib"])
    results["after training, obspa, no fine-tuning"] = accuracy(w / "obspa.onnx", files["test"])

    width = max(map(len, results))
    print(f"\ntest accuracy (onnxruntime, {np.load(files['test'])['labels'].size} held-out digits), "
          f"keep {flops} of MACs:")
    for k, v in results.items():
        print(f"  {k:<{width}}  {100 * v:6.2f} %")
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
