"""spa-prune profile: measure a model's latency cost table on this machine, for --target-latency."""
from __future__ import annotations

import argparse
import sys
import time

from .. import driver
from ..budget import CostModel
from ..errors import SpaError
from ..fileio import check_outputs
from ..latency import ALIGN, CLOCKS, MIN_RUNS, LatencyModel, profile
from ..options import check_counts
from .common import add_memory_limit, input_shape


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="measure a latency cost table for --target-latency",
                description="Measure a model's latency cost table with onnxruntime on this machine (run it on the "
                            "deployment machine and carry the file: spa-prune IN OUT --target-latency MS "
                            "--latency-table TABLE.json).")
    p.add_argument("input", help="ONNX file, or zoo:NAME[:small][:dynamo]")
    p.add_argument("-o", "--output", required=True, help="where to write the JSON table (replaced atomically)")
    p.add_argument("--batch", type=int, default=1, help="batch size the latency is stated at (default 1)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=MIN_RUNS,
                   help=f"timed runs per measurement (default {MIN_RUNS}; the end-to-end time uses at least "
                        f"{MIN_RUNS})")
    p.add_argument("--input-shape", action="append", type=input_shape, default=[], metavar="NAME=D1,D2,...",
                   help="fix the dims of an input (repeatable); the batch dim is replaced by --batch")
    p.add_argument("--align", type=int, default=ALIGN,
                   help=f"time and predict conv channel counts in whole blocks of this many (default {ALIGN}: "
                        "onnxruntime's blocked CPU convolutions; 1: exact counts)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time (default); cpu: the calling thread's CPU time, for a machine shared with "
                        "other work (--threads 1 only; the end-to-end correction then measures the same way)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress or summary on stderr")
    add_memory_limit(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    """spa-prune profile IN.onnx -o TABLE.json [--batch B] [--threads T] [--runs N] [--input-shape NAME=D..]"""
    check_counts([(f"--{name}", getattr(args, name)) for name in ("batch", "threads", "runs", "align")])
    if args.clock == "cpu" and args.threads != 1:
        raise SpaError("--clock cpu needs --threads 1 (other threads' work is not on the calling thread's clock)")
    check_outputs({"-o": args.output}, driver.input_paths(args.input))
    t0 = time.perf_counter()

    def log(msg):
        if not args.quiet:
            print(f"profile: {msg}", file=sys.stderr, flush=True)

    model = driver.load(args.input, dict(args.input_shape))
    analysis = driver.analyse(model)
    table = profile(model, analysis, batch=args.batch, threads=args.threads, runs=args.runs, log=log, clock=args.clock,
                    align=args.align)
    table.save(args.output)
    if not args.quiet:
        lm = LatencyModel(table, CostModel(analysis), analysis)
        s = lm.summary()
        print(f"profile: wrote {args.output}: {s['layers']} layers, {s['signatures']} distinct signatures; end to "
              f"end {table.full_ms:.3f} ms (p10 {table.full['p10']:.3f}, p90 {table.full['p90']:.3f}; batch "
              f"{table.batch}, {table.threads} thread(s), {table.clock} clock); layers {s['layers_ms']:.3f} ms + rest {s['rest_ms']:.3f} "
              f"ms + overhead {s['overhead_ms']:.4f} ms, scale {s['scale']:.3f}; "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
