"""Allocation benchmark: banded vs uniform vs global, all with importance obspa (reconstruction on).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_allocation.py \\
        --models resnet1d_mnist1d resnet20_digits mobilenetv2_digits resnet56_digits --seeds 0 1 2 \\
        --keeps 0.7 0.5 0.3 --modes calib datafree --allocations banded uniform global > allocation.md

A benchmark, not a test. For each trained network (`.bench/quality/{model}-seed{seed}.pt`, from
tools/train_bench.py; missing ones are skipped and listed), mode (`calib`: the 128 training samples
tools/bench_quality.py writes; `datafree`: no --calib, synthesized inputs), fraction of MACs kept and
allocation, the BN-folded ONNX export is pruned by `spa.driver.prune(..., importance="obspa",
allocation=A, target_flops=F)` and evaluated in onnxruntime on the test set. The scores do not depend on the
allocation or the budget, so they are computed once per (model, seed, mode) and reused (the run is otherwise
the normal pipeline: selection, Apply, verification, reconstruction). Markdown on stdout (mean ± std over
the seeds, accuracy in %, and the banded - uniform difference), every row as JSON in `--json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python tools/bench_allocation.py`
    sys.path.insert(0, str(ROOT))

from spa import driver, pipeline, select, synthesis  # noqa: E402
from tools import bench_quality as bq  # noqa: E402

DEFAULT_BAND, DEFAULT_OPENS = select.BAND, select.BAND_OPENS
MODELS = ("resnet1d_mnist1d", "resnet20_digits", "mobilenetv2_digits", "resnet56_digits")


def memoized_scores():
    """pipeline.score, remembered per (model file, criterion, data): the allocations and budgets share it."""
    original = pipeline.score
    memo: dict = {}

    def score(analysis, importance, aggregation, normalization, inputs):
        key = (memoized_scores.key, importance, aggregation, normalization)
        if key not in memo:
            memo[key] = original(analysis, importance, aggregation, normalization, inputs)
        return dict(memo[key])

    pipeline.score = score
    return memo


memoized_scores.key = None


def memoized_inversion():
    """spa.synthesis.invert_in_parts, remembered per (model file, sample count): every allocation and budget of
    one data-free (model, seed) starts from the same synthesized inputs, as one run of the CLI would."""
    original = synthesis.invert_in_parts
    memo: dict = {}

    def invert(g, start, inputs, steps, ranges=None):
        key = (memoized_scores.key, inputs.samples, steps, tuple(sorted((ranges or {}).items())))
        if key not in memo:
            memo[key] = original(g, start, inputs, steps, ranges)
        return {k: v.copy() for k, v in memo[key].items()}

    synthesis.invert_in_parts = invert
    return memo


def run_one(s: bq.Subject, mode: str, keep: float, allocation: str, out: Path) -> dict:
    """allocation: a name spa-prune accepts, or 'banded@W' (banded with a band of ±W)."""
    memoized_scores.key = (str(s.onnx_path), mode)
    name, _, band = allocation.partition("@")
    select.BAND = float(band) if band else DEFAULT_BAND   # banded@W: a fixed band of ±W at every budget
    select.BAND_OPENS = 0.0 if band else DEFAULT_OPENS
    dest = out / f"{s.model_name}-s{s.seed}-{mode}-{keep}-{allocation}.onnx"
    t = time.perf_counter()
    rep = driver.prune(str(s.onnx_path), str(dest), target_flops=keep, importance="obspa", allocation=name,
                       calib=str(s.calib_path) if mode == "calib" else None,
                       input_shapes={"input": (1, *s.input_shape)}).report
    acc = bq.onnx_accuracy(str(dest), s.data.x_test, s.data.y_test)
    dest.unlink()
    held = next(iter(rep.get("fidelity", {}).get("outputs", {}).values()), {})
    return {"holdout": held, "model": s.model_name, "seed": s.seed, "mode": mode, "keep": keep, "allocation": allocation,
            "acc": 100 * acc, "macs_ratio": rep["macs"]["ratio"], "unpruned": 100 * s.onnx_acc,
            "kept": [g["kept"] for g in rep["per_group"]], "units": [g["units"] for g in rep["per_group"]],
            "time_s": time.perf_counter() - t}


def cell(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def markdown(rows: list[dict], allocations: list[str], argv: list[str], missing: list[str]) -> str:
    lines = ["# Allocation benchmark (importance obspa, reconstruction on, no fine-tuning)", "",
             f"`{' '.join(['tools/bench_allocation.py', *argv])}`; load average at the end "
             f"{os.getloadavg()[0]:.2f}. Test accuracy %, mean ± std over seeds (n = seeds).", ""]
    if missing:
        lines += [f"Not measured (weights missing): {', '.join(missing)}", ""]
    head = ["model (unpruned)", "mode", "keep", "n", *allocations]
    if "banded" in allocations and "uniform" in allocations:
        head.append("banded - uniform")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = []
    for r in rows:
        k = (r["model"], r["mode"], r["keep"])
        if k not in keys:
            keys.append(k)
    for model, mode, keep in keys:
        sel = [r for r in rows if (r["model"], r["mode"], r["keep"]) == (model, mode, keep)]
        unpruned = statistics.mean(r["unpruned"] for r in sel)
        by = {a: {r["seed"]: r["acc"] for r in sel if r["allocation"] == a} for a in allocations}
        seeds = sorted(set.intersection(*(set(v) for v in by.values())) if by else set())
        row = [f"{model} ({unpruned:.2f})", mode, f"{keep}", str(len(seeds))]
        row += [cell([by[a][s] for s in seeds]) for a in allocations]
        if len(head) > len(row):
            row.append(cell([by["banded"][s] - by["uniform"][s] for s in seeds]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--keeps", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    p.add_argument("--modes", nargs="+", default=["calib", "datafree"], choices=["calib", "datafree"])
    p.add_argument("--allocations", nargs="+", default=["banded", "uniform", "global"])
    p.add_argument("--weights", type=Path, default=ROOT / ".bench" / "quality")
    p.add_argument("--json", type=Path, default=None, help="append every row here (JSON lines)")
    args = p.parse_args(argv)
    memoized_scores()
    memoized_inversion()
    out = args.weights / "allocation"
    out.mkdir(parents=True, exist_ok=True)
    rows, missing = [], []
    for model in args.models:
        for seed in args.seeds:
            if not (args.weights / f"{model}-seed{seed}.pt").exists():
                missing.append(f"{model} seed {seed}")
                continue
            s = bq.prepare(model, seed, args.weights / "mine", keep_bn=False)
            for mode in args.modes:
                for keep in args.keeps:
                    for allocation in args.allocations:
                        r = run_one(s, mode, keep, allocation, out)
                        rows.append(r)
                        print(f"# {model} s{seed} {mode} keep {keep} {allocation}: {r['acc']:.2f} "
                              f"(macs {r['macs_ratio']:.4f}, kept {r['kept']})", file=sys.stderr, flush=True)
                        if args.json:
                            with open(args.json, "a") as f:
                                f.write(json.dumps(r) + "\n")
    print(markdown(rows, args.allocations, argv, missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
