"""The pattern search (issue 13 part 3): PPO+GATv2 vs uniform vs random K per conv at equal pattern-aware MACs
and equal evaluations, test accuracy after the driver's pattern path (full masked refit, 128 calibration samples).

    python tools/bench_pattern_search.py --models resnet20_digits --seeds 0 --keep 0.3 --evals 32
    python tools/bench_pattern_search.py --models resnet20_digits resnet56_digits --seeds 0 1 2 --resume

A benchmark, not a test. For each trained net (tools/train_bench.py, cached under .bench/quality/), seed, budget
F (pattern-aware MACs kept) and policy: `spa.search.sculpt.search_patterns` (same evaluator, same `--evals`,
the reward measured on --score-split of the 128 calibration samples, 0.25 by default), then `prune_with_patterns`
with the calibration set (the normal pattern path: OBS re-choice, masked refit), then onnxruntime test accuracy.
Wall and CPU time (process time, all threads) of the search are recorded: the machine is shared. Rows go to
--out/results.json (appended, `--resume` skips measured rows) and a table (mean over seeds) to --out/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import bench_quality as bq  # noqa: E402


def run_one(model: str, seed: int, keep: float, policy: str, evals: int, metric: str, out: Path,
            score_split: float = 0.25) -> dict:
    from spa.search.sculpt import prune_with_patterns, search_patterns

    s = bq.prepare(model, seed, out / "nets", keep_bn=False)
    shapes = {"input": (1, *s.input_shape)}
    t, c = time.perf_counter(), time.process_time()
    assignment, h = search_patterns(str(s.onnx_path), target_flops=keep, policy=policy, calib=str(s.calib_path),
                                    evals=evals, seed=seed, metric=metric, input_shapes=shapes,
                                    score_split=score_split)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    path = out / f"{model}-s{seed}-{keep}-{policy}.onnx"
    rep = prune_with_patterns(str(s.onnx_path), str(path), assignment, calib=str(s.calib_path),
                              input_shapes=shapes).report
    acc = bq.onnx_accuracy(str(path), s.data.x_test, s.data.y_test)
    macs = rep["patterns"]["macs"]
    return {"model": model, "seed": seed, "keep": keep, "policy": policy, "evals": evals, "metric": metric,
            "test_acc": 100 * acc, "unpruned_acc": 100 * s.onnx_acc, "pattern_aware_ratio": macs["pattern_aware_ratio"],
            "score_split": score_split, "search_wall_s": round(wall, 1), "search_cpu_s": round(cpu, 1), "best_reward": h.meta["best_reward"],
            "best_index": h.meta["best_index"], "alpha": h.meta.get("alpha"),
            "ks": [v["k"] for v in h.meta["assignment"].values()],
            "emptied": [v["kernels_emptied"] for v in h.meta["assignment"].values()],
            "load": os.getloadavg()[0]}


def table(rows: list[dict]) -> str:
    keys = sorted({(r["model"], r["keep"], r["evals"], r["metric"]) for r in rows})
    lines = ["| net | keep (pattern-aware MACs) | evals | metric | unpruned | ppo-gnn | uniform | random | "
             "ppo − uniform | seeds | search wall / CPU s (ppo) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, k, e, met in keys:
        sel = [r for r in rows if (r["model"], r["keep"], r["evals"], r["metric"]) == (m, k, e, met)]
        by = {p: {r["seed"]: r for r in sel if r["policy"] == p} for p in ("ppo-gnn", "uniform", "random")}
        seeds = sorted(set.intersection(*(set(v) for v in by.values()))) if all(by.values()) else []

        def mean(p, key="test_acc", seeds=seeds, by=by):
            vals = [by[p][s][key] for s in (seeds or sorted(by[p]))]
            return statistics.mean(vals) if vals else float("nan")

        un = statistics.mean(r["unpruned_acc"] for r in sel)
        diff = mean("ppo-gnn") - mean("uniform") if seeds else float("nan")
        ppo = by["ppo-gnn"]
        t = (f"{statistics.median(r['search_wall_s'] for r in ppo.values()):.0f} / "
             f"{statistics.median(r['search_cpu_s'] for r in ppo.values()):.0f}") if ppo else "-"
        lines.append(f"| {m} | {k} | {e} | {met} | {un:.2f} | {mean('ppo-gnn'):.2f} | {mean('uniform'):.2f} | "
                     f"{mean('random'):.2f} | {diff:+.2f} | {','.join(map(str, seeds))} | {t} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20_digits"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--keep", nargs="+", type=float, default=[0.3])
    p.add_argument("--policies", nargs="+", default=["ppo-gnn", "uniform", "random"])
    p.add_argument("--evals", type=int, default=32)
    p.add_argument("--metric", default="kl")
    p.add_argument("--score-split", type=lambda v: None if v == "none" else float(v), default=0.25,
                   help="share of the calibration samples the reward is measured on (the rest fit the refit); "
                        "'none': every sample fits the refit and measures the reward (in-sample)")
    p.add_argument("--out", default=".bench/pattern_search")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nets").mkdir(exist_ok=True)
    res = out / "results.json"
    rows = json.loads(res.read_text()) if res.exists() else []
    done = {(r["model"], r["seed"], r["keep"], r["policy"], r["evals"], r["metric"]) for r in rows}
    for m in a.models:
        for s in a.seeds:
            for k in a.keep:
                for pol in a.policies:
                    if a.resume and (m, s, k, pol, a.evals, a.metric) in done:
                        continue
                    r = run_one(m, s, k, pol, a.evals, a.metric, out, a.score_split)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
                    res.write_text(json.dumps(rows, indent=1))
    cmd = "python tools/bench_pattern_search.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.md").write_text(f"`{cmd}`\n\n" + table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
