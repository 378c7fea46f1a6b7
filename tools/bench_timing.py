"""Per-candidate evaluation time of the search's reward on the trained benchmark models.

    OMP_NUM_THREADS=1 python -m tools.bench_timing --models resnet56_digits --samples 128 256 --candidates 20

For each model (trained and cached by tools/train_bench.py, exported with BN folded, as in the quality
benchmark), calibration size (TRAIN samples, with labels) and FLOPs target, `--candidates` random candidates are
projected onto the budget and evaluated by `CalibEvaluator` in each reward mode:

    plain        Apply on a copy + one onnxruntime session over the calibration batches
    recalibrate  Apply on a copy + one torch pass with BN/affine re-calibration (the fast path)
    refit        Apply on a copy + passes.reconstruct.Reconstruct (OBSPA refit + re-calibration), then onnxruntime

Prints one row per (model, samples, target, mode): median and mean seconds per candidate (apply and run parts),
the one-off setup (analysis, scores, teacher outputs) and the implied time for 300 candidates. Test data is never
touched. `--json FILE` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("plain", "recalibrate", "refit")


def _subject(name: str, seed: int, n: int, out: Path):
    """(onnx path, Calib of n TRAIN samples with labels, input shape)."""
    from spa.calib import Calib
    from spa.models import datasets
    from spa.models.bench_nets import BENCH_MODELS
    from tools import train_bench

    spec = BENCH_MODELS[name]
    path = out / f"{name}-seed{seed}.onnx"
    pt = train_bench.cache_paths(name, seed)[0]
    if not path.exists() or (pt.exists() and path.stat().st_mtime < pt.stat().st_mtime):
        model, _ = train_bench.train(name, seed)
        data = datasets.load(spec.dataset)
        train_bench.export_onnx(model, path, input_shape=spec.input_shape, check_x=data.x_test[:64])
    data = datasets.load(spec.dataset)
    x, y = datasets.calib_subset(data.x_train, data.y_train, n, seed=seed)
    return path, Calib({"input": x}, y.astype(np.int64)), spec.input_shape


def time_one(name: str, samples: int, target: float, modes, candidates: int, seed: int, out: Path,
             threads: int | None) -> list[dict]:
    from spa.search import CalibEvaluator, SearchProblem

    path, calib, shape = _subject(name, seed, samples, out)
    t0 = time.perf_counter()
    problem = SearchProblem.build(str(path), target_flops=target, importance="l2", calib=calib,
                                  input_shapes={"input": (1, *shape)})
    t_problem = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    pj = problem.projector
    cands = [pj.project(rng.random(len(pj.action_groups))).kept for _ in range(candidates)]
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        ev = CalibEvaluator(problem, calib, recalibrate=mode in ("recalibrate", "refit"), refit=mode == "refit",
                            threads=threads, seed=seed)
        t_teacher = time.perf_counter() - t0
        per, apply_s, run_s = [], [], []
        n = candidates if mode != "refit" else max(2, candidates // 5)
        for kept in cands[:n]:
            e = ev(kept)
            if e.cached:
                continue
            per.append(e.metrics["seconds"])
            apply_s.append(e.metrics["apply_s"])
            run_s.append(e.metrics["run_s"])
        row = {"model": name, "samples": samples, "target_flops": target, "mode": mode, "candidates": len(per),
               "median_s": statistics.median(per), "mean_s": statistics.fmean(per),
               "apply_s": statistics.fmean(apply_s), "run_s": statistics.fmean(run_s),
               "setup_s": t_problem + t_teacher, "per_300_s": 300 * statistics.fmean(per) + t_problem + t_teacher,
               "threads": threads or "ort default", "omp": os.environ.get("OMP_NUM_THREADS", "unset"),
               "load_avg": round(os.getloadavg()[0], 2)}
        rows.append(row)
        print(f"{name:20s} n={samples:4d} F={target:<4} {mode:12s} {len(per):3d} cand  "
              f"median {row['median_s']:.3f} s  mean {row['mean_s']:.3f} s (apply {row['apply_s']:.3f}, "
              f"run {row['run_s']:.3f})  setup {row['setup_s']:.2f} s  -> 300 cand {row['per_300_s']:.0f} s  "
              f"[load {row['load_avg']}]", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet56_digits"])
    ap.add_argument("--samples", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.1])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--out", default=".bench/search", help="where the ONNX exports go")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        for n in args.samples:
            for target in args.targets:
                rows += time_one(name, n, target, args.modes, args.candidates, args.seed, out, args.threads or None)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
