"""Train (and cache) the networks of the pruning quality benchmark; export them to ONNX.

    python tools/train_bench.py --models all --seeds 0 1 2     # train what is not cached, print accuracies

Trained weights are cached as `.bench/quality/{model}-seed{seed}.pt` with a JSON beside it (test accuracy,
training time, hyper-parameters), so `tools/bench_quality.py` never retrains. CPU only, 2 threads, a few
minutes per model and seed. The data of every seed is the same (`models.datasets`, default data seed): the
training seed changes only the initialization, the batch order and the augmentation.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning made 2-thread torch 4-10x
# slower under load (450 vs 105 ms per ResNet1d batch at load average 4). Read once, when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python tools/train_bench.py` from anywhere
    sys.path.insert(0, str(ROOT))

from spa.models import datasets
from spa.models.bench_nets import BENCH_MODELS

CACHE = ROOT / ".bench" / "quality"


@dataclass(frozen=True)
class TrainConfig:
    """SGD with Nesterov momentum, cosine learning rate over all steps (no warm restarts).

    `warmup_epochs` ramps the rate up linearly first: without it ResNet-56 sat at chance for ~8 epochs at
    lr 0.05 (He et al. warm ResNet-110 up the same way).
    """

    epochs: int
    batch: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    max_shift: int = 0  # random-shift augmentation in pixels (images only)
    warmup_epochs: int = 0


CONFIGS = {
    "resnet1d_mnist1d": TrainConfig(epochs=12, batch=128, lr=0.05),
    "resnet20_digits": TrainConfig(epochs=20, batch=64, lr=0.05, max_shift=3),
    "resnet56_digits": TrainConfig(epochs=20, batch=64, lr=0.05, max_shift=3, warmup_epochs=2),
    "mobilenetv2_digits": TrainConfig(epochs=20, batch=64, lr=0.05, max_shift=3),
}


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def same_config(cached: dict, cfg: TrainConfig) -> bool:
    """Cached weights were trained with `cfg` (fields added later count as their default)."""
    return {f.name: cached.get(f.name, f.default) for f in fields(cfg)} == asdict(cfg)


def cache_paths(model_name: str, seed: int) -> tuple[Path, Path]:
    stem = CACHE / f"{model_name}-seed{seed}"
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy of a torch model in eval mode (restores the mode it found)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    model.train(was_training)
    return correct / len(x)


def _fit(model: nn.Module, data: datasets.Dataset, cfg: TrainConfig, seed: int) -> None:
    """The training loop: one cosine schedule over epochs x batches, progress once per epoch."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    steps_per_epoch = math.ceil(len(x) / cfg.batch)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                          weight_decay=cfg.weight_decay)
    n_steps, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warm if warm else 1.0) * 0.5 * (1 + math.cos(math.pi * step / n_steps)))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(cfg.epochs):
        model.train()
        t0, total, correct = time.perf_counter(), 0.0, 0
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch):
            idx = perm[i:i + cfg.batch]
            xb, yb = x[idx], y[idx]
            if cfg.max_shift:
                xb = datasets.random_shift(xb, cfg.max_shift, data.fill, gen)
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == yb).sum())
        if epoch == cfg.epochs - 1 or epoch % max(1, cfg.epochs // 6) == 0:
            test = f", test acc {accuracy(model, data.x_test, data.y_test):.4f}"
        else:
            test = ""
        log(f"  epoch {epoch + 1}/{cfg.epochs}: loss {total / len(x):.4f}, train acc {correct / len(x):.4f}"
            f"{test} ({time.perf_counter() - t0:.1f} s)")


def build(model_name: str, seed: int) -> nn.Module:
    """A fresh, seeded, untrained model (the seed fixes the initialization)."""
    torch.manual_seed(seed)
    return BENCH_MODELS[model_name].build()


def dataset_of(model_name: str) -> datasets.Dataset:
    return datasets.load(BENCH_MODELS[model_name].dataset)


def train(model_name: str, seed: int, *, force: bool = False) -> tuple[nn.Module, float]:
    """Return (trained model in eval mode, test accuracy), training only when nothing is cached."""
    pt, meta = cache_paths(model_name, seed)
    model, cfg = build(model_name, seed), CONFIGS[model_name]
    if pt.exists() and meta.exists() and not force:
        info = json.loads(meta.read_text())
        if same_config(info.get("config") or {}, cfg):
            model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
            return model.eval(), info["test_accuracy"]
        log(f"{model_name} seed {seed}: cached weights were trained with {info.get('config')}; retraining")
    torch.set_num_threads(2)
    data = dataset_of(model_name)
    log(f"training {model_name} seed {seed}: {len(data.x_train)} train / {len(data.x_test)} test samples, {cfg}")
    t0 = time.perf_counter()
    _fit(model, data, cfg, seed)
    seconds = time.perf_counter() - t0
    model.eval()
    acc = accuracy(model, data.x_test, data.y_test)
    pt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), pt)
    meta.write_text(json.dumps({"model": model_name, "seed": seed, "test_accuracy": acc,
                                "train_seconds": round(seconds, 1), "torch": torch.__version__,
                                "config": asdict(cfg), "dataset": data.name,
                                "train_samples": len(data.x_train), "test_samples": len(data.x_test)}, indent=1))
    log(f"{model_name} seed {seed}: test accuracy {acc:.4f} in {seconds:.0f} s -> {pt}")
    return model, acc


def export_onnx(model: nn.Module, path, keep_bn: bool = False, *, input_shape, check_x: np.ndarray | None = None,
                atol: float = 1e-4, input_name: str = "input") -> Path:
    """Export with the TorchScript exporter (opset 17, dynamic batch) and check it against torch in onnxruntime.

    keep_bn=False (default): the exporter folds every BatchNormalization into the preceding Conv.
    keep_bn=True: `training=TrainingMode.PRESERVE` with the model in eval mode keeps the BatchNormalization
    nodes (inference form, training_mode=0); `do_constant_folding=False` would keep them too. Raises
    AssertionError when onnxruntime and torch differ by more than `atol` (absolute, on logits) on
    `check_x` (default: 8 standard-normal samples; its first sample is the traced example, so token ids stay
    integers). `input_name`: the graph input's name (the output is `logits`).
    """
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if check_x is None:
        check_x = np.random.default_rng(0).standard_normal((8, *input_shape)).astype(np.float32)
    example = torch.from_numpy(np.ascontiguousarray(check_x[:1]))
    kwargs = {"dynamo": False, "opset_version": 17, "input_names": [input_name], "output_names": ["logits"],
              "dynamic_axes": {input_name: {0: "batch"}, "logits": {0: "batch"}}}
    if keep_bn:
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(tmp), **kwargs)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(None, {input_name: check_x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(check_x)).numpy()
    err = float(np.abs(got - want).max())
    if err > atol:
        tmp.unlink()
        raise AssertionError(f"ONNX export of {path.name} differs from torch by {err:.2e} > {atol}")
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["all"], help=f"'all' or some of {', '.join(BENCH_MODELS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--force", action="store_true", help="retrain even when cached")
    args = ap.parse_args(argv)
    names = list(BENCH_MODELS) if args.models == ["all"] else args.models
    torch.set_num_threads(2)
    rows = []
    for name in names:
        for seed in args.seeds:
            train(name, seed, force=args.force)
            meta = json.loads(cache_paths(name, seed)[1].read_text())
            rows.append((name, seed, meta["test_accuracy"], meta["train_seconds"]))
    print("\n| model | seed | test accuracy | training time (s) |\n|---|---:|---:|---:|")
    for name, seed, acc, secs in rows:
        print(f"| {name} | {seed} | {100 * acc:.2f} % | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
