"""Search on Ray (issue 14): the same search with the local executor and on a local Ray instance.

    python tools/bench_ray.py                                  # random, 300 evaluations, resnet56_digits seed 0
    python tools/bench_ray.py --order ray local --policies random dist

A benchmark, not a test. The setting is tools/bench_search.py's (one `SearchProblem` with `importance="obspa"`,
FLOPs kept `--budget`, one `CalibEvaluator` with the benchmark's default reward: `metric="kl"`, per-candidate
re-calibration, on the 128 TRAIN calibration samples of `bench_quality.prepare`). Each run clears the reward
cache and searches with the same seed:

* `local`: the evaluations in this process, onnxruntime and torch on `--threads` (2: both cores);
* `ray`: a local Ray instance (started once, `--workers` CPUs, 127.0.0.1), `--workers` single-threaded actors
  created for each run (their start-up, deserializing the evaluator and importing torch, counts in the run's
  time).

Per run: wall time of `search()` (including the executor's start-up), the evaluator's summed measuring time, the
best reward, its index and kept counts, the load average before and after. Runs go in `--order`, repeated
`--rounds` times (interleave them: the machine is shared). Rows are appended to OUT/results.json and printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_quality: spinning OpenMP threads under load
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python tools/bench_ray.py`
    sys.path.insert(0, str(ROOT))

from tools import bench_quality, bench_search

DEFAULT_OUT = ROOT / ".bench" / "ray"


def log(msg: str) -> None:
    print(f"[ray {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def one_run(setting, policy: str, executor: str, args) -> dict:
    from spa.search import search

    ev = setting.evaluator
    bench_search.fresh_cache(ev)
    load0 = bench_search.loadavg()
    t0 = time.perf_counter()
    plan, h = search(str(setting.subject.onnx_path), policy, problem=setting.problem, evaluator=ev,
                     evals=args.evals, seed=args.search_seed, executor=executor,
                     workers=args.workers if executor == "ray" else None)
    wall = time.perf_counter() - t0
    return {"model": setting.subject.model_name, "seed": setting.subject.seed, "budget": args.budget,
            "policy": policy, "executor": executor, "evals": len(h), "measured": ev.measured,
            "wall_s": round(wall, 2), "search_s": h.meta["search_s"], "measure_s": round(ev.seconds, 2),
            "per_candidate_s": round(ev.seconds / max(ev.measured, 1), 4), "best_reward": h.meta["best_reward"],
            "best_index": h.meta["best_index"], "kept": h.meta["kept"], "history": [r for _, r, _ in h],
            "executor_info": h.meta["executor"], "load_before": load0, "load_after": bench_search.loadavg(),
            "threads_local": args.threads, "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56_digits", choices=bench_search.MODELS)
    ap.add_argument("--seed", type=int, default=0, help="training seed of the benchmark net")
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=0.3, help="fraction of FLOPs kept")
    ap.add_argument("--policies", nargs="+", default=["random"], choices=["random", "dist"])
    ap.add_argument("--evals", type=int, default=300)
    ap.add_argument("--order", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--rounds", type=int, default=1, help="repeat --order this many times")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (one CPU and one thread each)")
    ap.add_argument("--threads", type=int, default=bench_search.THREADS, help="threads of the local executor")
    ap.add_argument("--reward", choices=bench_search.REWARDS, default="recal")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from spa.search.executor import connect

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    subject = bench_quality.prepare(args.model, args.seed, ROOT / ".bench" / "quality" / "mine", keep_bn=False)
    setting = bench_search.build_setting(subject, bench_search.Budget("flops", args.budget), None,
                                         bench_quality.CALIB_N, args.reward)
    setting.evaluator.threads = args.threads
    log(f"setup {setting.setup_s:.1f} s; load {bench_search.loadavg()}")
    ray_init_s = None
    if "ray" in args.order:
        t0 = time.perf_counter()
        connect(None, num_cpus=args.workers)
        ray_init_s = round(time.perf_counter() - t0, 2)
        log(f"local Ray instance ({args.workers} CPUs) started in {ray_init_s} s")
    results = args.out / "results.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    mine = []
    for _ in range(args.rounds):
        for policy in args.policies:
            for executor in args.order:
                row = one_run(setting, policy, executor, args)
                row["ray_init_s"] = ray_init_s
                rows.append(row)
                mine.append(row)
                results.write_text(json.dumps(rows, indent=1))
                log(f"{policy:6s} {executor:5s} {row['wall_s']:7.1f} s  ({row['per_candidate_s']:.3f} s/candidate "
                    f"measured, {row['measured']} measured)  best {row['best_reward']:.6f} at #{row['best_index']}  "
                    f"load {row['load_before'][0]} -> {row['load_after'][0]}")
    for policy in args.policies:
        by = {e: [r for r in mine if r["policy"] == policy and r["executor"] == e] for e in ("local", "ray")}
        if by["local"] and by["ray"]:
            loc = statistics.median(r["wall_s"] for r in by["local"])
            ray_ = statistics.median(r["wall_s"] for r in by["ray"])
            same = all(r["kept"] == by["local"][0]["kept"] for r in by["local"] + by["ray"])
            identical = all(r["history"] == by["local"][0]["history"] for r in by["local"] + by["ray"])
            log(f"{policy}: local {loc:.1f} s, ray {ray_:.1f} s (medians): speed-up {loc / ray_:.2f}x; same best "
                f"plan {same}; identical history {identical}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
