"""Does the realized onnxruntime speed-up follow the MACs? (issue 16, item 6) Several width variants of one budget.

    python tools/bench_widths.py R50.onnx --target-flops 0.5 --batch 1 32 \\
        --variant "r1=--fast --round-to 1" --variant "auto=--fast" --variant "r16=--fast --round-to 16"

A benchmark, not a test. Each variant is `spa-prune MODEL OUT --target-flops F --input-shape ... OPTIONS` (a
subprocess, verified), pruned ONCE (or a file pruned beforehand: --pruned); then, per batch size, the original and
every variant run in one process, interleaved (every round runs each model once, the order rotated every round),
onnxruntime CPU EP with --threads intra-op threads (spinning off), graph optimization ALL, after warm-up.

Per variant: MACs ratio; median latency; speed-up = median(original) / median(variant) and its fraction of the
MAC reduction (speed-up x MACs ratio: 1.0 means the time fell exactly as the MACs did); the median of the
per-round paired ratios (less sensitive to load drifting) and the ratio of the fastest rounds; the median CPU time
of the process per run and its ratio (spinning off, so CPU time is work done: the steadiest measure on a shared
machine); the layout reorders in onnxruntime's optimized graph (`com.microsoft.nchwc:Reorder*`: a convolution or
pool whose channel count does not suit the NCHWc layout); the distinct kept widths. With --profile, kernel time
per op type from onnxruntime's profiler at the largest batch (minimum over 2 profiled runs per node).

Set OMP_WAIT_POLICY=PASSIVE (done here) and state the load average (printed) with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def session(path: str, threads: int, **extra):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # CPU time = work, not spinning
    for k, v in extra.items():
        setattr(opts, k, v)
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def reorders(path: str, threads: int) -> int:
    """Layout conversions in onnxruntime's optimized graph beyond the one every NCHWc model has at its end."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = str(Path(tmp) / "opt.onnx")
        session(path, threads, optimized_model_filepath=opt)
        ops = Counter(n.op_type for n in onnx.load(opt, load_external_data=False).graph.node)
    return sum(c for op, c in ops.items() if op.startswith("Reorder"))


def profile(path: str, threads: int, name: str, x, runs: int = 2) -> dict[str, float]:
    """Kernel ms per op type: each node's minimum over `runs` profiled runs (the least disturbed by load)."""
    with tempfile.TemporaryDirectory() as tmp:
        s = session(path, threads, enable_profiling=True, profile_file_prefix=str(Path(tmp) / "p"))
        s.run(None, {name: x})
        s.end_profiling()
        s = session(path, threads, enable_profiling=True, profile_file_prefix=str(Path(tmp) / "q"))
        for _ in range(runs):
            s.run(None, {name: x})
        events = json.loads(Path(s.end_profiling()).read_text())
    per_node: dict[tuple, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node.setdefault((e["name"], e["args"]["op_name"]), []).append(e["dur"] / 1e3)
    out: Counter = Counter()
    for (_, op), durs in per_node.items():
        out[op] += min(durs)
    return dict(out)


def prune(model: str, out: Path, target: float, shape: str, options: list[str]) -> dict:
    rep = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "spa.cli", model, str(out), "--target-flops", str(target), "--input-shape", shape,
           "--report", str(rep), "-q", *options]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(rep.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                   help="a label and the spa-prune options after --target-flops (repeatable)")
    p.add_argument("--pruned", action="append", default=[], metavar="NAME=FILE",
                   help="a model pruned beforehand (its report beside it, FILE with .json), timed like a variant")
    p.add_argument("--target-flops", type=float, default=0.5)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, nargs="+", default=None,
                   help="interleaved rounds per batch size (default 60 at batch <= 4, else 7)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input-shape", default="input=1,3,224,224", help="analysis shape passed to spa-prune")
    p.add_argument("--profile", action="store_true", help="kernel time per op type at the largest batch")
    p.add_argument("--out", type=Path, default=None, help="keep the pruned models and reports here")
    args = p.parse_args(argv)
    rounds = args.rounds or [60 if b <= 4 else 7 for b in args.batch]
    if len(rounds) != len(args.batch):
        p.error("--rounds needs one count per --batch")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    tmp = tempfile.TemporaryDirectory()
    out_dir = args.out or Path(tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, info = {"original": args.model}, {"original": {"macs": 1.0, "widths": "", "cmd": ""}}
    for spec in args.variant:
        label, _, opts = spec.partition("=")
        path = out_dir / f"{label}.onnx"
        rep = prune(args.model, path, args.target_flops, args.input_shape, shlex.split(opts))
        widths = sorted({(g["kept"], g["units"]) for g in rep["per_group"] if g["kept"] < g["units"]})
        paths[label] = str(path)
        info[label] = {"macs": rep["macs"]["ratio"], "widths": " ".join(f"{k}/{u}" for k, u in widths),
                       "cmd": f"--target-flops {args.target_flops} {opts}".strip(),
                       "verification": rep["verification"]["status"]}
        print(f"pruned {label}: MACs ratio {rep['macs']['ratio']:.4f}, widths {info[label]['widths']}", flush=True)
    for spec in args.pruned:
        label, _, path = spec.partition("=")
        rep = json.loads(Path(path).with_suffix(".json").read_text())
        widths = sorted({(g["kept"], g["units"]) for g in rep["per_group"] if g["kept"] < g["units"]})
        paths[label] = path
        info[label] = {"macs": rep["macs"]["ratio"], "widths": " ".join(f"{k}/{u}" for k, u in widths),
                       "cmd": f"(file {path})", "verification": rep["verification"]["status"]}
    if len(paths) == 1:
        p.error("give at least one --variant or --pruned")
    for label, path in paths.items():
        info[label]["reorders"] = reorders(path, args.threads)
    name, dims = args.input_shape.split("=")
    labels = list(paths)
    results = {}
    for batch, n_rounds in zip(args.batch, rounds):
        x = np.random.default_rng(0).standard_normal([batch, *[int(d) for d in dims.split(",")[1:]]]).astype(np.float32)
        sessions = {k: session(v, args.threads) for k, v in paths.items()}
        for s in sessions.values():
            for _ in range(3 if batch <= 4 else 1):
                s.run(None, {name: x})
        times = {k: [] for k in labels}
        cpu = {k: [] for k in labels}
        loads = []
        for r in range(n_rounds):
            loads.append(os.getloadavg()[0])
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for k in order:
                t, c = time.perf_counter(), time.process_time()
                sessions[k].run(None, {name: x})
                times[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
        results[batch] = (times, loads, cpu)
        del sessions
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"\nmodel {args.model}, onnxruntime CPU EP, {args.threads} threads, interleaved rounds "
          f"{', '.join(f'b{b}: {n}' for b, n in zip(args.batch, rounds))}; 1-min load during the rounds "
          + ", ".join(f"b{b}: {min(ld):.1f}-{max(ld):.1f}" for b, (_, ld, _) in results.items()))
    head = "| variant | options | MACs ratio | reorders |"
    for b in args.batch:
        head += f" b{b} ms | b{b} speed-up: medians (paired; fastest) | b{b} / MAC reduction |"
    print(head + " widths kept (of) |")
    print("|" + "---|" * (head.count("|") - 1))
    for k in labels:
        row = f"| {k} | `{info[k]['cmd']}` | {info[k]['macs']:.3f} | {info[k]['reorders']} |"
        for times, _, _ in results.values():
            o, q = statistics.median(times["original"]), statistics.median(times[k])
            paired = statistics.median(a / c for a, c in zip(times["original"], times[k]))
            fastest = min(times["original"]) / min(times[k])
            row += f" {q * 1e3:.1f} | {o / q:.2f} ({paired:.2f}; {fastest:.2f}) | {o / q * info[k]['macs']:.2f} |"
        print(row + f" {info[k]['widths']} |")
    print("\nCPU time of the process per run (both intra-op threads, spinning off): less disturbed by other load "
          "than wall time\n")
    head = "| variant | MACs ratio |" + "".join(f" b{b} CPU ms | b{b} CPU speed-up | b{b} / MAC reduction |"
                                           for b in args.batch)
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for k in labels:
        row = f"| {k} | {info[k]['macs']:.3f} |"
        for _, _, cpu in results.values():
            o, q = statistics.median(cpu["original"]), statistics.median(cpu[k])
            row += f" {q * 1e3:.1f} | {o / q:.2f} | {o / q * info[k]['macs']:.2f} |"
        print(row)
    if args.profile:
        b = max(args.batch)
        x = np.random.default_rng(0).standard_normal([b, *[int(d) for d in dims.split(",")[1:]]]).astype(np.float32)
        prof = {k: profile(v, args.threads, name, x) for k, v in paths.items()}
        ops = sorted({op for d in prof.values() for op in d}, key=lambda op: -prof["original"].get(op, 0))
        print(f"\nkernel ms per op type at batch {b} (min over 2 profiled runs per node)\n")
        print("| op | " + " | ".join(labels) + " |\n|---|" + "---:|" * len(labels))
        for op in ops:
            print(f"| {op} | " + " | ".join(f"{prof[k].get(op, 0):.1f}" for k in labels) + " |")
        print("| **sum** | " + " | ".join(f"{sum(prof[k].values()):.1f}" for k in labels) + " |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
