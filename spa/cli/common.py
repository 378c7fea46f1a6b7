"""What every subcommand's command line shares: the parser that turns usage errors into one line and exit 2,
argument types, the common options, progress on a terminal and the JSON report writer."""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..errors import SpaError, one_line
from ..fileio import StagedOutputs, atomic_write_text
from ..memory import DEFAULT_MEMORY_LIMIT_GB
from .summary import summary


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other bad input."""

    def error(self, message):
        raise SpaError(f"{message} (see {self.prog} --help)")


def input_shape(text: str):
    """NAME=D1,D2,... (or NAME=D1xD2x...) for --input-shape."""
    try:
        name, dims = text.rsplit("=", 1)
        return name, tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,..., got '{text}'")


def input_range(text: str):
    """[NAME=]MEAN,STD for --input-range: (name, (mean, std)); no name: every float input ('*')."""
    name, _, values = text.rpartition("=")
    try:
        mean, std = (float(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [NAME=]MEAN,STD (e.g. 0.45,0.25), got '{text}'")
    return name or "*", (mean, std)


def add_memory_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-limit", type=float, default=DEFAULT_MEMORY_LIMIT_GB, metavar="GB",
                   help=f"refuse, before allocating, verification inputs, synthesized samples, calibration arrays "
                        f"and Hessians larger than this (default {DEFAULT_MEMORY_LIMIT_GB:g} GB)")


def add_common(p: argparse.ArgumentParser) -> None:
    add_memory_limit(p)
    p.add_argument("--input-shape", action="append", type=input_shape, default=[], metavar="NAME=D1,D2,...",
                   help="fix the dims of an input for the cost model and verification (repeatable)")
    p.add_argument("--report", metavar="FILE", help="write a JSON report")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary table on stderr")


def stage_progress(quiet: bool):
    """A one-line stage indicator on a terminal (None when quiet or not a terminal)."""
    if quiet or not sys.stderr.isatty():
        return None
    t0 = time.perf_counter()

    def show(stage: str):
        sys.stderr.write(f"\r[spa-prune {time.perf_counter() - t0:6.1f}s] {stage:<12}")
        sys.stderr.flush()

    return show


def clear_progress(show) -> None:
    if show:
        sys.stderr.write("\r" + " " * 40 + "\r")


def write_json(data: dict, path) -> None:
    """A report or table as JSON, written atomically (missing parent folders are created, as for the model)."""
    atomic_write_text(path, json.dumps(data, indent=1))


def driver_kwargs(args) -> dict:
    """The driver options every pruning path shares (scoring, constraints, verification, data, compensation)."""
    return {"importance": args.importance, "fast": getattr(args, "fast", False),
            "max_drop": getattr(args, "max_drop", None), "aggregation": args.aggregation, "normalization": args.normalization,
            "min_channels": args.min_channels, "round_to": args.round_to, "max_ratio": args.max_ratio,
            "exclude": args.exclude, "save_plan": args.save_plan, "verify": not args.no_verify, "rtol": args.rtol,
            "strict": args.strict, "fold_constants": args.fold_constants, "calib": args.calib,
            "calib_limit": args.calib_samples, "loss": args.loss, "reconstruct": args.reconstruct,
            "recalibrate": args.recalibrate, "compensate": args.compensate, "dbscan": parse_dbscan(args.dbscan),
            "positions": args.positions, "damp": args.damp, "exact_hessians": args.exact_hessians,
            "samples": args.synth_samples,
            "synth_steps": getattr(args, "synth_steps", None), "seed": args.seed,
            "input_range": dict(args.input_range) if getattr(args, "input_range", None) else None,
            "memory_limit_gb": args.memory_limit}


def python_warnings(args) -> list[str]:
    """The Python warnings main() caught during this run, one line each, without repeats."""
    out: list[str] = []
    for w in getattr(args, "caught_warnings", None) or []:
        kind = "" if w.category is UserWarning else f"{w.category.__name__}: "
        line = kind + one_line(w.message, 300)
        if line not in out:
            out.append(line)
    return out


def finish(args, report: dict, outputs: StagedOutputs | None = None) -> int:
    """Write the report (with the run's other staged outputs, all renamed into place together) and print the
    summary; the Python warnings main() caught go into both."""
    report["warnings"] = list(report.get("warnings") or []) + [
        w for w in python_warnings(args) if w not in (report.get("warnings") or [])]
    if outputs is None:
        if args.report:
            write_json(report, args.report)
    else:
        if args.report:
            outputs.stage(args.report, lambda f: f.write(json.dumps(report, indent=1)), binary=False)
        outputs.commit()
    if not args.quiet:
        print(summary(report), file=sys.stderr)
    return 0


def parse_dbscan(text):
    if text is None:
        return None
    try:
        eps, k = text.split(",")
        return float(eps), int(k)
    except ValueError:
        raise SpaError(f"--dbscan expects EPS,MIN_SAMPLES (e.g. 0.3,2), got '{text}'")
