"""Fine-tuning after pruning: spa-prune (one-shot / progressive, with / without distillation) vs Torch-Pruning,
same MACs, same fine-tuning budget.

    python tools/bench_finetune.py --quick                  # 1 model, 1 seed, 1 epoch: checks the harness
    python tools/bench_finetune.py                          # ResNet-56 + MobileNetV2-small, 3 seeds, 5 epochs
    python tools/bench_finetune.py --resume --seeds 2       # add rows, keep those already measured

A benchmark, not a test. For each trained network of the quality benchmark (`tools/train_bench.py`, cached;
digits 32x32, 1257 train / 540 test), training seed and target fraction F of MACs kept (default 0.5):

* ours, from the ONNX export alone (BN folded): `spa.driver.prune(onnx, target_flops=F, importance='obspa',
  allocation='uniform', calib=<128 train samples>)` (the best no-fine-tuning method of the quality benchmark),
  then `spa.finetune.finetune` on the whole train set for E epochs, with distillation from the unpruned ONNX
  model (`-kd`, alpha 0.5, T 0.75) or cross-entropy only (`-ce`). Progressive (`prog-*`): `--steps 3`, one
  epoch of fine-tuning after steps 1 and 2, then E - 2 epochs at the end: E epochs in all, like one-shot.
* Torch-Pruning 1.6.1 on a deep copy of the SAME torch model: MagnitudeImportance(p=2), local (per-layer)
  ranking — the best TP variant at keep 0.5 in the quality benchmark — bisected on `pruning_ratio` to the same
  MACs (within 1 %), then E epochs of fine-tuning of the torch module (BN in training mode) with the same loss
  function (spa.finetune's), optimizer (SGD, Nesterov momentum 0.9, weight decay 5e-4), peak learning rate,
  cosine schedule, batch size and sample order: `tp-ce` and `tp-kd` (teacher: the unpruned torch model).

Validation (`--val-split F`, default 0.2): the same F of the train set (per class, seeded by the training seed:
`spa.finetune.split_holdout`) is held out for every method; fine-tuning trains on the rest, and every method
returns its best epoch on the held-out part - accuracy, ties to the lower loss (the training loss: CE, or CE+KD
with the teacher), epoch 0 (the model as pruned) included: `spa.finetune`'s --keep-best for ours, the same rule
in the torch loop for TP. `--val-split 0` trains on the whole train set and returns the last epoch.

Test accuracy is measured once, after fine-tuning (onnxruntime for ours, torch for TP). Outputs under `--out`
(default .bench/finetune/): results.json and results.md (mean ± std over seeds, with the command line).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_quality: spinning OpenMP threads under load
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spa.models import datasets
from tools import bench_quality

METHODS = ("oneshot-kd", "oneshot-ce", "prog-kd", "prog-ce", "tp-kd", "tp-ce")
DEFAULT_OUT = ROOT / ".bench" / "finetune"


def log(msg: str) -> None:
    print(f"[finetune {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Settings:
    def __init__(self, args):
        self.epochs, self.lr, self.batch = args.epochs, args.lr, args.batch_size
        self.steps, self.val_split = args.steps, args.val_split

    def finetune_kwargs(self, seed: int) -> dict:
        return {"lr": self.lr, "batch_size": self.batch, "seed": seed, "optimizer": "sgd", "weight_decay": 5e-4,
                "momentum": 0.9, "val_split": self.val_split}


# ---- ours ------------------------------------------------------------------------------------------------------

def run_ours(s: bench_quality.Subject, method: str, target: float, cfg: Settings, train_npz: Path, out: Path) -> dict:
    from spa import driver
    from spa.finetune import finetune
    from spa.progressive import prune_progressive

    kd = method.endswith("-kd")
    teacher = s.onnx_path if kd else None
    prune_kw = {"importance": "obspa", "allocation": "uniform", "calib": str(s.calib_path)}
    tag = f"{s.model_name}-seed{s.seed}-{method}-{target}"
    t0 = time.perf_counter()
    if method.startswith("oneshot"):
        res = driver.prune(str(s.onnx_path), None, target_flops=target, **prune_kw)
        epochs_left = cfg.epochs
    else:
        between = 1 if cfg.epochs >= cfg.steps else 0
        res = prune_progressive(str(s.onnx_path), None, steps=cfg.steps, target_flops=target,
                                finetune_data=str(train_npz), finetune_epochs=between,
                                finetune_options=cfg.finetune_kwargs(s.seed), kd=kd, **prune_kw)
        epochs_left = cfg.epochs - between * (cfg.steps - 1)
    prune_s = time.perf_counter() - t0
    pruned = out / f"{tag}-pruned.onnx"
    from spa.ir import save_model
    save_model(res.model.graph.to_model(), pruned)
    acc_pruned = bench_quality.onnx_accuracy(pruned, s.data.x_test, s.data.y_test)
    t1 = time.perf_counter()
    ft = finetune(pruned, out / f"{tag}.onnx", data=str(train_npz), teacher=teacher, epochs=epochs_left,
                  **cfg.finetune_kwargs(s.seed))
    ft_s = time.perf_counter() - t1
    acc = bench_quality.onnx_accuracy(out / f"{tag}.onnx", s.data.x_test, s.data.y_test)
    between_s = sum(t["seconds"] for t in (res.report.get("progressive") or {}).get("finetune", []))
    return {"method": method, "accuracy": acc, "accuracy_pruned": acc_pruned, "best_epoch": ft.report["best_epoch"],
            "macs_ratio": res.report["macs"]["after"] / res.report["macs"]["before"],
            "params_ratio": res.report["params"]["ratio"], "prune_s": round(prune_s - between_s, 1),
            "finetune_s": round(ft_s + between_s, 1), "epochs": cfg.epochs,
            "curve": [h.get("loss") for h in ft.history[1:]]}


# ---- Torch-Pruning ---------------------------------------------------------------------------------------------

def run_tp(s: bench_quality.Subject, method: str, target: float, cfg: Settings, matcher: bench_quality.MacMatcher) -> dict:
    from spa.finetune import _loss_fn

    t0 = time.perf_counter()
    pruned, _ = matcher.match(target * s.torch_macs, 0.01)
    prune_s = time.perf_counter() - t0
    model = copy.deepcopy(pruned.model)
    acc_pruned = bench_quality.train_bench.accuracy(model, s.data.x_test, s.data.y_test)
    kd = method.endswith("-kd")
    x, y, xv, yv = split(s, cfg.val_split)
    teacher = teacher_val = None
    if kd:
        with torch.no_grad():
            teacher = s.model.eval()(torch.from_numpy(x)).numpy()
            teacher_val = s.model.eval()(torch.from_numpy(xv)).numpy() if len(xv) else None
    loss_fn = _loss_fn(1, 0, 0.5 if kd else 0.0, 0.75, [max(float(np.var(teacher)), 1e-12)] if kd else None)

    def validate(epoch: int) -> None:
        """spa.finetune's --keep-best rule: best held-out accuracy, ties to the lower loss; epoch 0 counts."""
        nonlocal best
        if not len(xv):
            return
        model.eval()
        with torch.no_grad():
            out = model(torch.from_numpy(xv))
            loss, _ = loss_fn([out], torch.from_numpy(yv), [torch.from_numpy(teacher_val)] if kd else None)
        k = (float((out.argmax(1).numpy() == yv).mean()), -float(loss))
        if best is None or k > best[0]:
            best = (k, epoch, copy.deepcopy(model.state_dict()))

    best = None
    validate(0)
    torch.manual_seed(s.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(x) / cfg.batch)
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / total)))
    gen = np.random.default_rng(s.seed)  # the same sample order as spa.finetune with the same seed
    t1 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = gen.permutation(len(x))
        for b in range(steps_per_epoch):
            idx = np.sort(order[b * cfg.batch:(b + 1) * cfg.batch])
            out = model(torch.from_numpy(x[idx]))
            teach = [torch.from_numpy(teacher[idx])] if kd else None
            loss, _ = loss_fn([out], torch.from_numpy(y[idx]), teach)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        validate(epoch + 1)
    model.eval()
    if best is not None:
        model.load_state_dict(best[2])
    ft_s = time.perf_counter() - t1
    acc = bench_quality.train_bench.accuracy(model, s.data.x_test, s.data.y_test)
    n_params = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in s.model.parameters())
    return {"method": method, "accuracy": acc, "accuracy_pruned": acc_pruned, "macs_ratio": pruned.macs / s.torch_macs,
            "params_ratio": n_params, "prune_s": round(prune_s, 1), "finetune_s": round(ft_s, 1),
            "epochs": cfg.epochs, "tp_pruning_ratio": pruned.ratio,
            "best_epoch": best[1] if best is not None else cfg.epochs}


def split(s: bench_quality.Subject, fraction: float):
    """The train set minus the held-out part, and the held-out part: spa.finetune.split_holdout with the
    training seed, so TP and ours see the same samples."""
    from spa.calib import Calib
    from spa.finetune import split_holdout
    x, y = s.data.x_train, s.data.y_train.astype(np.int64)
    if fraction <= 0:
        return x, y, x[:0], y[:0]
    tr, va = split_holdout(Calib({"input": x}, y), fraction, s.seed)
    return tr.inputs["input"], tr.labels, va.inputs["input"], va.labels


# ---- results ---------------------------------------------------------------------------------------------------

def key(r: dict) -> tuple:
    return (r["model"], r["seed"], r["method"], float(r["target"]), r["epochs"], float(r.get("val_split", 0.0)))


def load_rows(path: Path, resume: bool) -> dict:
    if not (resume and path.exists()):
        return {"runs": [], "rows": {}}
    old = json.loads(path.read_text())
    return {"runs": old.get("runs", []), "rows": {key(r): r for r in old.get("rows", [])}}


def save_rows(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": state["runs"], "rows": list(state["rows"].values())}, indent=1))
    tmp.replace(path)


def markdown(state: dict) -> str:
    rows = [r for r in state["rows"].values() if r.get("accuracy") is not None]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], float(r["target"]), r["epochs"], float(r.get("val_split", 0.0))), []).append(r)
    out = []
    for (model, target, epochs, vs), rs in sorted(groups.items()):
        unpruned = statistics.fmean(100 * r["unpruned"] for r in rs)
        protocol = (f"{vs:g} of the train set held out, best epoch on it returned" if vs
                    else "whole train set, last epoch returned")
        out.append(f"**{model}**, keep {target:g} of MACs, {epochs} epochs of fine-tuning, {protocol} "
                   f"(unpruned {unpruned:.2f} %):\n")
        out.append("| method | test acc. after fine-tuning (%) | as pruned (%) | MACs kept | params kept | "
                   "prune s | fine-tune s | best epochs | n |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for m in METHODS:
            ms = [r for r in rs if r["method"] == m]
            if not ms:
                continue
            acc = [100 * r["accuracy"] for r in ms]
            pre = [100 * r["accuracy_pruned"] for r in ms]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            out.append(f"| {m} | {statistics.fmean(acc):.2f} ± {sd:.2f} | {statistics.fmean(pre):.2f} | "
                       f"{statistics.fmean(r['macs_ratio'] for r in ms):.3f} | "
                       f"{statistics.fmean(r['params_ratio'] for r in ms):.3f} | "
                       f"{statistics.fmean(r['prune_s'] for r in ms):.1f} | "
                       f"{statistics.fmean(r['finetune_s'] for r in ms):.1f} | "
                       f"{','.join(str(r.get('best_epoch', '-')) for r in ms)} | {len(ms)} |")
        out.append("")
    out.append("Commands:\n")
    out += [f"- `{r['command']}` ({r['when']}; {r['versions']})" for r in state["runs"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet56_digits", "mobilenetv2_digits"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5], help="fractions of MACs kept")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="progressive steps")
    ap.add_argument("--val-split", type=float, default=0.2,
                    help="held-out fraction of the train set for epoch selection (0: none, last epoch)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--quick", action="store_true", help="resnet20_digits, seed 0, 1 epoch, 2 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.epochs, args.steps = ["resnet20_digits"], [0], 2, 2
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = Settings(args)
    path = args.out / "results.json"
    state = load_rows(path, args.resume)
    state["runs"].append({"command": "python tools/bench_finetune.py " + shlex.join(argv or sys.argv[1:]),
                          "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "versions": bench_quality.versions()})
    for model_name in args.models:
        for seed in args.seeds:
            s = bench_quality.prepare(model_name, seed, args.out, keep_bn=False)
            train_npz = args.out / f"train-{model_name}.npz"
            if not train_npz.exists():
                data = datasets.load(bench_quality.BENCH_MODELS[model_name].dataset)
                np.savez(train_npz, input=data.x_train, labels=data.y_train)
            matcher = None
            for target in args.targets:
                for method in args.methods:
                    k = (model_name, seed, method, float(target), args.epochs, float(args.val_split))
                    if k in state["rows"] and state["rows"][k].get("accuracy") is not None:
                        continue
                    log(f"{model_name} seed {seed} keep {target} {method} ...")
                    if method.startswith("tp"):
                        if matcher is None:
                            matcher = bench_quality.MacMatcher(s, "magnitude", "local", {})
                        row = run_tp(s, method, target, cfg, matcher)
                    else:
                        row = run_ours(s, method, target, cfg, train_npz, args.out)
                    row.update(model=model_name, seed=seed, target=target, unpruned=s.onnx_acc,
                               val_split=args.val_split)
                    state["rows"][k] = row
                    log(f"  {method}: {100 * row['accuracy_pruned']:.2f} % as pruned -> {100 * row['accuracy']:.2f} % "
                        f"after {args.epochs} epochs (MACs {row['macs_ratio']:.3f}; prune {row['prune_s']} s, "
                        f"fine-tune {row['finetune_s']} s)")
                    save_rows(path, state)
    (args.out / "results.md").write_text(markdown(state))
    print(markdown(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
