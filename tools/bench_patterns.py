"""Pattern pruning (issue 13) on the quality-benchmark nets: accuracy, pattern-aware MACs, file size, latency.

    python tools/bench_patterns.py accuracy --models resnet20_digits --seeds 0 1 2     # K of 9 + refit
    python tools/bench_patterns.py compare --models resnet20_digits --keep 0.3          # channels+patterns vs channels
    python tools/bench_patterns.py storage --models resnet20_digits --seeds 0           # --sparse-storage size, latency
    python tools/bench_patterns.py table                                                # markdown from results.jsonl

A benchmark, not a test. Every row is appended to `--out`/results.jsonl (default .bench/patterns/) with the
command that produced it; `table` summarizes them (mean over seeds).

* accuracy: `spa.driver.prune(onnx, out, patterns=K, calib=...)` (128 TRAIN samples; `data-free`: synthesized
  inputs; `none`: --fast, masks only, no refit), every conv kernel larger than K positions pruned to K; test
  accuracy in onnxruntime vs the unpruned export.
* compare: at a pattern-aware MAC budget B (fraction kept, `--keep`), channels alone (`target_flops=B`) vs
  channels + patterns (the channel budget F bisected so that the pattern-aware MACs after K-of-9 patterns are B;
  the uniform allocation's widths do not depend on the scores, so the bisection runs the cheap --fast path), both
  with obspa + uniform + refit on the same calibration samples.
* storage: the dense and the --sparse-storage files of the same pruned model: bytes, the largest output
  difference on 512 test samples, and onnxruntime latency at batch 1, one thread, interleaved (A B A B, medians).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spa import driver  # noqa: E402
from tools import bench_quality as bq  # noqa: E402

MODELS = ["resnet20_digits", "resnet56_digits", "mobilenetv2_digits", "resnet1d_mnist1d"]
DEFAULT_K = {"resnet1d_mnist1d": 2}   # 1-D k=3/5 kernels: 2 positions (K=4 would leave its k=3 convs dense)
DEFAULT_OUT = ROOT / ".bench" / "patterns"


def log(msg: str) -> None:
    print(f"[patterns {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def subject(model: str, seed: int, out: Path):
    return bq.prepare(model, seed, out / "exports", keep_bn=False)


def prune(s, path: Path, **kw) -> tuple[dict, float, float]:
    t = time.perf_counter()
    rep = driver.prune(str(s.onnx_path), str(path), input_shapes={"input": (1, *s.input_shape)}, **kw).report
    secs = time.perf_counter() - t
    return rep, secs, bq.onnx_accuracy(str(path), s.data.x_test, s.data.y_test)


def row_out(out: Path, row: dict) -> None:
    row = {"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), "load_avg": os.getloadavg()[0], **row}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    log(json.dumps({k: v for k, v in row.items() if k != "command"}))


def run_accuracy(args, out: Path) -> None:
    for model in args.models:
        k = args.k or DEFAULT_K.get(model, 4)
        for seed in args.seeds:
            s = subject(model, seed, out)
            for data in args.data:
                kw = {"calib": str(s.calib_path)} if data == "calib" else {"fast": True} if data == "none" else {}
                rep, secs, acc = prune(s, out / f"{model}-{seed}-k{k}-{data}.onnx", patterns=k, **kw)
                p = rep["patterns"]
                row_out(out, {"kind": "accuracy", "model": model, "seed": seed, "k": k, "data": data,
                              "unpruned": s.onnx_acc, "acc": acc, "drop_pts": 100 * (s.onnx_acc - acc),
                              "pattern_aware_ratio": p["macs"]["pattern_aware_ratio"],
                              "weights_kept": p["weights_kept"], "weights_patterned": p["weights"],
                              "fidelity_drop_pct": rep["fidelity"]["drop_pct"], "seconds": secs})


def channel_budget(s, k: int, keep: float, out: Path) -> tuple[float, float]:
    """The channel budget F whose channels + K-pattern model keeps `keep` of the MACs pattern-aware (bisection on
    the --fast path, no verification; widths of the uniform allocation do not depend on the scores)."""
    lo, hi = keep, 1.0
    best = (hi, 1.0)
    for _ in range(12):
        f = (lo + hi) / 2
        rep = driver.prune(str(s.onnx_path), None, target_flops=f, patterns=k, fast=True, verify=False,
                           input_shapes={"input": (1, *s.input_shape)}).report
        ratio = rep["patterns"]["macs"]["pattern_aware_ratio"]
        if ratio <= keep:
            best, lo = (f, ratio), f
        else:
            hi = f
    return best


def run_compare(args, out: Path) -> None:
    budgets: dict = {}
    for model in args.models:
        k = args.k or DEFAULT_K.get(model, 4)
        for seed in args.seeds:
            s = subject(model, seed, out)
            for keep, label in ((keep, label) for keep in args.keep for label in args.data if label != "none"):
                calib = {"calib": str(s.calib_path)} if label == "calib" else {}
                rep_c, secs_c, acc_c = prune(s, out / f"{model}-{seed}-ch{keep}.onnx", target_flops=keep,
                                             allocation="uniform", **calib)
                if (model, seed, keep) not in budgets:
                    budgets[(model, seed, keep)] = channel_budget(s, k, keep, out)
                f, _ = budgets[(model, seed, keep)]
                rep_p, secs_p, acc_p = prune(s, out / f"{model}-{seed}-ch+k{k}-{keep}.onnx", target_flops=f,
                                             patterns=k, allocation="uniform", **calib)
                row_out(out, {"kind": "compare", "model": model, "seed": seed, "k": k, "data": label,
                              "keep_pattern_aware": keep, "unpruned": s.onnx_acc,
                              "channels_acc": acc_c, "channels_macs_ratio": rep_c["macs"]["ratio"],
                              "channels_patterns_acc": acc_p, "channel_budget": f,
                              "channels_patterns_dense_ratio": rep_p["macs"]["ratio"],
                              "channels_patterns_aware_ratio": rep_p["patterns"]["macs"]["pattern_aware_ratio"],
                              "gain_pts": 100 * (acc_p - acc_c), "seconds": [secs_c, secs_p]})


def latency_ms(paths: list[str], x: np.ndarray, rounds: int, runs: int) -> list[float]:
    """Median batch-1 latency of each model, one intra-op thread, interleaved rounds (A B C A B C ...)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in paths]
    name = sessions[0].get_inputs()[0].name
    times = [[] for _ in paths]
    for sess in sessions:
        for _ in range(10):
            sess.run(None, {name: x})
    for _ in range(rounds):
        for i, sess in enumerate(sessions):
            t = time.perf_counter()
            for _ in range(runs):
                sess.run(None, {name: x})
            times[i].append(1000 * (time.perf_counter() - t) / runs)
    return [statistics.median(t) for t in times]


def run_storage(args, out: Path) -> None:
    import onnxruntime as ort

    for model in args.models:
        k = args.k or DEFAULT_K.get(model, 4)
        for seed in args.seeds:
            s = subject(model, seed, out)
            dense, sparse = out / f"{model}-{seed}-k{k}-dense.onnx", out / f"{model}-{seed}-k{k}-sparse.onnx"
            rep_d, _, acc_d = prune(s, dense, patterns=k, calib=str(s.calib_path))
            rep_s, secs, acc_s = prune(s, sparse, patterns=k, calib=str(s.calib_path), sparse_storage=True)
            x = s.data.x_test[:512]
            runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                    for p in (dense, sparse)]
            lat = latency_ms([str(s.onnx_path), str(dense), str(sparse)], s.data.x_test[:1], args.rounds, args.runs)
            row_out(out, {"kind": "storage", "model": model, "seed": seed, "k": k,
                          "unpruned_bytes": s.onnx_path.stat().st_size, "dense_bytes": dense.stat().st_size,
                          "sparse_bytes": sparse.stat().st_size,
                          "sparse_over_dense": sparse.stat().st_size / dense.stat().st_size,
                          "max_abs_output_diff": float(np.abs(runs[0] - runs[1]).max()), "acc_dense": acc_d,
                          "acc_sparse": acc_s, "pattern_aware_ratio": rep_s["patterns"]["macs"]["pattern_aware_ratio"],
                          "latency_ms": {"unpruned": lat[0], "dense_patterned": lat[1], "sparse_storage": lat[2]},
                          "seconds": secs})


def run_table(args, out: Path) -> None:
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    groups: dict = {}
    for r in rows:
        key = (r["kind"], r["model"], r.get("k"), r.get("data"), r.get("keep_pattern_aware"))
        groups.setdefault(key, []).append(r)
    mean = statistics.mean
    print("| net | K | data | seeds | unpruned % | pruned % | drop (pts) | pattern-aware MACs kept |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, model, k, data, _), rs in groups.items():
        if kind == "accuracy":
            print(f"| {model} | {k} | {data} | {len(rs)} | {100 * mean(r['unpruned'] for r in rs):.2f} | "
                  f"{100 * mean(r['acc'] for r in rs):.2f} | {mean(r['drop_pts'] for r in rs):.2f} "
                  f"(worst {max(r['drop_pts'] for r in rs):.2f}) | {mean(r['pattern_aware_ratio'] for r in rs):.3f} |")
    print()
    print("| net | K | data | pattern-aware keep | seeds | channels alone % | channels + patterns % (channel budget) "
          "| gain (pts) |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, model, k, data, keep), rs in groups.items():
        if kind == "compare":
            print(f"| {model} | {k} | {data} | {keep} | {len(rs)} | {100 * mean(r['channels_acc'] for r in rs):.2f} | "
                  f"{100 * mean(r['channels_patterns_acc'] for r in rs):.2f} "
                  f"({mean(r['channel_budget'] for r in rs):.3f}) | {mean(r['gain_pts'] for r in rs):+.2f} |")
    print()
    print("| net | K | seeds | unpruned file | dense patterned | sparse storage | sparse/dense | max out diff | "
          "latency ms unpruned / dense / sparse |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (kind, model, k, _, _), rs in groups.items():
        if kind == "storage":
            lat = {n: mean(r["latency_ms"][n] for r in rs) for n in ("unpruned", "dense_patterned", "sparse_storage")}
            print(f"| {model} | {k} | {len(rs)} | {mean(r['unpruned_bytes'] for r in rs):,.0f} | "
                  f"{mean(r['dense_bytes'] for r in rs):,.0f} | {mean(r['sparse_bytes'] for r in rs):,.0f} | "
                  f"{mean(r['sparse_over_dense'] for r in rs):.3f} | {max(r['max_abs_output_diff'] for r in rs):g} | "
                  f"{lat['unpruned']:.3f} / {lat['dense_patterned']:.3f} / {lat['sparse_storage']:.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["accuracy", "compare", "storage", "table"])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--k", type=int, help="positions kept per kernel (default 4; 2 for the 1-D net)")
    p.add_argument("--data", nargs="+", default=["calib", "data-free"], choices=["calib", "data-free", "none"])
    p.add_argument("--keep", nargs="+", type=float, default=[0.3], help="compare: pattern-aware MACs kept")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    {"accuracy": run_accuracy, "compare": run_compare, "storage": run_storage, "table": run_table}[args.what](
        args, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
