"""onnxruntime latency of an original vs a pruned model, interleaved, at one batch size.

    python tools/bench_latency.py ORIGINAL.onnx -- --target-flops 0.5 --round-to 8 --max-ratio 0.6

prunes ORIGINAL with the spa-prune options after `--` (verified), then times both models (2 threads, graph
optimization ALL, warm-up, median of interleaved rounds) and prints a markdown row with the command.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    spa_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input-shape", default="input=1,3,224,224", help="analysis shape passed to spa-prune")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out, rep = Path(tmp) / "pruned.onnx", Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "spa.cli", args.model, str(out), "--input-shape", args.input_shape,
               "--report", str(rep), "-q", *spa_args]
        subprocess.run(cmd, check=True)
        report = json.loads(rep.read_text())
        name, dims = args.input_shape.split("=")
        shape = [args.batch, *[int(d) for d in dims.split(",")[1:]]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        sessions = {"original": session(args.model, args.threads), "pruned": session(str(out), args.threads)}
        times = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, {name: x})
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {name: x})
                times[k].append(time.perf_counter() - t)
    o, q = statistics.median(times["original"]), statistics.median(times["pruned"])
    print(f"| `spa-prune {' '.join(spa_args)}` | {report['macs']['ratio']:.3f} | {report['params']['ratio']:.3f} | "
          f"{report['verification']['status']} | {args.batch} | {o * 1e3:.0f} | {q * 1e3:.0f} | {o / q:.2f} |")
    kept = sorted(r["kept"] / r["units"] for r in report["per_group"])
    print(f"kept fraction per group: min {kept[0]:.2f}, median {kept[len(kept) // 2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
