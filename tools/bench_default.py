"""Quality by default (issue 16, item 7): the command a user types first, beside our explicit modes and two peers.

    python tools/bench_default.py --quick                  # resnet20_digits, seed 0, keep 0.5: checks the harness
    python tools/bench_default.py                          # default subset x seeds 0 1 2 x keep 0.7 0.5 0.3
    python tools/bench_default.py --models resnet1d_mnist1d --resume    # add rows, keep those already measured

A benchmark, not a test. For each trained network of the quality benchmark (`tools/train_bench.py`, cached;
`tools.bench_quality.prepare` exports it to ONNX with BN folded and writes the 128-sample calibration .npz from the
TRAIN split), each training seed and each fraction F of MACs kept (`--targets`, default 0.7 0.5 0.3, i.e. 30 / 50 /
70 % removed), one row per method:

* ours, always through the CLI in a subprocess (`sys.executable -m spa.cli IN OUT --target-flops F ...`), so the
  rows measure whatever the defaults are when the benchmark runs (see OUR_METHODS). Time = the whole process, as
  the user waits for it (start-up and verification included); peak RSS of that process.
* Torch-Pruning 1.6.1, magnitude (L2), global and local ranking, on the same trained torch model, BN statistics
  re-estimated on the 128 calibration samples; pruning_ratio bisected as `tools/bench_quality.py` does (its
  MacMatcher, torch MACs within --mac-tol). The pruned model is exported to ONNX (BN folded) so that its accuracy
  comes from onnxruntime and its MACs from our cost model, like every other row.
* onnxsim 0.8 on the SAME ONNX file: `apply_structured_pruning` (L2 filter norms) or
  `apply_structured_wanda_pruning` (|W|·|X| on the calibration samples), both with their default per-chain
  `sparsity` (global_sparsity=False), each followed by `apply_pruning_finetune` (ridge repair of the
  MatMul/Gemm layers) on the 128 calibration samples. `sparsity` is bisected until OUR cost model
  (`spa.load` + `spa.analyse` -> total_macs of the peer's output file) is within --mac-tol of F x unpruned MACs,
  or the closest probe when no probe gets that close (`mac_error` in results.json). A call that fails becomes a
  row "n/a (reason)".
* the unpruned ONNX export.

Accuracy: onnxruntime on the test split (`spa.models.datasets`). No fine-tuning anywhere. Outputs under --out
(default .bench/default/): results.json (every row, with the command lines), results.md (mean ± std over seeds,
MACs actually kept, time, and the issue's accuracy goals checked against the default rows).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see tools/bench_quality.py)


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python tools/bench_default.py`
    sys.path.insert(0, str(ROOT))

from spa.models.bench_nets import BENCH_MODELS
from tools import bench_quality as bq

DEFAULT_OUT = ROOT / ".bench" / "default"
DEFAULT_MODELS = ["resnet20_digits", "resnet1d_mnist1d", "mobilenetv2_digits", "resnet56_digits"]
CALIB = bq.CALIB  # placeholder, replaced by the (model, seed)'s calibration .npz

# ---- ours: method -> extra CLI arguments after `spa-prune IN OUT --target-flops F` ------------------------------
OUR_METHODS: dict[str, list[str]] = {
    "default-datafree": [],  # exactly what a user types first
    "default-calib": ["--calib", CALIB],
    "uniform+obspa": ["--importance", "obspa", "--allocation", "uniform", "--calib", CALIB],
    "global+obspa": ["--importance", "obspa", "--allocation", "global", "--calib", CALIB],
    "uniform+obspa-datafree": ["--importance", "obspa", "--allocation", "uniform"],
    "global+obspa-datafree": ["--importance", "obspa", "--allocation", "global"],
    "fast": ["--fast"],                                          # the instant path (magnitude, no reconstruction)
    "fast-global (old default)": ["--fast", "--allocation", "global"],  # what the plain command did before issue 16
}
TP_METHODS = {"tp-magnitude-global+bn": "global", "tp-magnitude-local+bn": "local"}
ONNXSIM_METHODS = {"onnxsim-l2+ft": "structured", "onnxsim-wanda+ft": "wanda"}
ALL_METHODS = [*OUR_METHODS, *TP_METHODS, *ONNXSIM_METHODS]
CALIB_BATCH = 32  # onnxsim takes calibration data as a list of {input: batch}


def log(msg: str) -> None:
    print(f"[default {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def our_macs(path, input_shape) -> int:
    """MACs of an ONNX file at batch 1 by our cost model (raises when the analysis fails)."""
    import spa

    return int(spa.analyse(spa.load(str(path), {"input": (1, *input_shape)})).total_macs)


# ---------------------------------------------------------------------------------------------------------------
# MACs matching for the onnxsim peer: bisection on a parameter that removes more as it grows
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Match:
    param: float | None  # the chosen probe (None: no probe succeeded)
    macs: int | None
    probes: list[tuple[float, int | None, str | None]] = field(default_factory=list)  # (param, macs, error)

    @property
    def error(self) -> str | None:
        """Why nothing matched (the last failure), when no probe succeeded."""
        return None if self.param is not None else next((e for _, _, e in reversed(self.probes) if e), "no probe")


def bisect_macs(measure: Callable[[float], int], target: float, tol: float = 0.01, lo: float = 0.0,
                hi: float = 1.0, max_iter: int = 16) -> Match:
    """Bisect `param` in (lo, hi) until measure(param) (MACs, non-increasing in param) is within `tol`
    (relative) of `target`; the closest probe when none gets that close. A probe that raises counts as
    over-pruned (the search moves towards smaller params) and is recorded with its error."""
    m = Match(None, None)
    for _ in range(max_iter):
        p = round((lo + hi) / 2, 9)
        try:
            macs, err = int(measure(p)), None
        except Exception as e:  # noqa: BLE001 - a peer that cannot prune this far
            macs, err = None, f"{type(e).__name__}: {e}"
        m.probes.append((p, macs, err))
        if macs is not None and (m.macs is None or abs(macs - target) < abs(m.macs - target)):
            m.param, m.macs = p, macs
        if macs is not None and abs(macs - target) <= tol * target:
            break
        if macs is None or macs < target:
            hi = p
        else:
            lo = p
    return m


# ---------------------------------------------------------------------------------------------------------------
# the three families
# ---------------------------------------------------------------------------------------------------------------
def cli_args(method: str, s: bq.Subject, target: float, dest: Path, report: Path) -> list[str]:
    extra = [str(s.calib_path) if a == CALIB else a for a in OUR_METHODS[method]]
    return [sys.executable, "-m", "spa.cli", str(s.onnx_path), str(dest), "--target-flops", f"{target:g}", *extra,
            "--report", str(report)]


# Runs the command and writes [exit status, wall seconds, peak RSS in KiB] as JSON to argv[1]. A small
# intermediary: a child forked straight from this (large) process would report the parent's RSS as its peak
# (Linux keeps the pre-exec high-water mark in ru_maxrss).
_MEASURE = ("import json, os, subprocess, sys, time\n"
            "t0 = time.perf_counter(); p = subprocess.Popen(sys.argv[2:])\n"
            "_, st, ru = os.wait4(p.pid, 0)\n"
            "json.dump([os.waitstatus_to_exitcode(st), time.perf_counter() - t0, ru.ru_maxrss], open(sys.argv[1], 'w'))")


def run_subprocess(argv: list[str], log_path: Path) -> tuple[int, float, float]:
    """(exit status, wall seconds, peak RSS in MB) of one child process; its output goes to `log_path`."""
    import json

    stats = log_path.with_suffix(".stats.json")
    with open(log_path, "w") as out:
        subprocess.run([sys.executable, "-c", _MEASURE, str(stats), *argv], stdout=out, stderr=subprocess.STDOUT,
                       cwd=ROOT, check=True)
    rc, seconds, rss_kib = json.loads(stats.read_text())
    stats.unlink()
    return rc, seconds, rss_kib / 1024


def run_ours(s: bq.Subject, method: str, target: float, out: Path) -> dict:
    import json

    stem = out / "pruned" / f"{s.model_name}-seed{s.seed}-{method}-f{target}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    dest, report, log_path = (Path(f"{stem}{x}") for x in (".onnx", ".json", ".log"))  # not with_suffix: "f0.5"
    for p in (dest, report):
        p.unlink(missing_ok=True)
    argv = cli_args(method, s, target, dest, report)
    shown = ["spa-prune", *(os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in argv[3:])]
    row = {"family": "ours", "cli": shlex.join(shown)}
    rc, seconds, rss = run_subprocess(argv, log_path)
    if rc != 0 or not dest.exists():
        tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
        return {**row, "error": f"n/a (exit {rc}: {tail[0][:200]})", "time_s": seconds}
    rep = json.loads(report.read_text())
    return {**row, "macs_ratio": rep["macs"]["ratio"], "params_ratio": rep["params"]["ratio"],
            "accuracy": bq.onnx_accuracy(dest, s.data.x_test, s.data.y_test), "time_s": seconds, "peak_rss_mb": rss,
            "verification": rep["verification"]["status"], "importance": str(rep.get("importance"))[:200],
            "fidelity_drop_pct": (rep.get("fidelity") or {}).get("drop_pct"),
            "fidelity_on": (rep.get("fidelity") or {}).get("on")}


class TPVariant:
    """One Torch-Pruning scope; its MacMatcher caches probes across the targets of one (model, seed)."""

    def __init__(self, s: bq.Subject, scope: str):
        self.matcher = bq.MacMatcher(s, "magnitude", scope, {})


def run_tp(s: bq.Subject, variant: TPVariant, method: str, target: float, tol: float, out: Path) -> dict:
    from tools import train_bench

    row = {"family": "tp", "match": f"pruning_ratio bisected on torch MACs (tol {tol:g}), MACs re-counted by ours"}
    t0 = time.perf_counter()
    try:
        best, used = variant.matcher.match(target * s.torch_macs, tol)
        search = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = bq.reestimate_bn(best.model, s.calib_x)
        bn_s = time.perf_counter() - t1
        dest = out / "pruned" / f"{s.model_name}-seed{s.seed}-{method}-f{target}.onnx"
        train_bench.export_onnx(model, dest, input_shape=s.input_shape, check_x=s.data.x_test[:64])
        macs = our_macs(dest, s.input_shape)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {**row, "error": f"n/a ({type(e).__name__}: {e})"}
    return {**row, "macs_ratio": macs / s.spa_macs, "torch_macs_ratio": best.macs / s.torch_macs,
            "mac_error": best.macs / (target * s.torch_macs) - 1, "pruning_ratio": best.ratio, "probes": len(used),
            "accuracy": bq.onnx_accuracy(dest, s.data.x_test, s.data.y_test),
            "time_s": best.seconds + bn_s, "search_time_s": search}


def calib_batches(s: bq.Subject) -> list[dict]:
    return [{"input": s.calib_x[i:i + CALIB_BATCH]} for i in range(0, len(s.calib_x), CALIB_BATCH)]


def onnxsim_prune(kind: str, src: str, sparsity: float, batches):
    from onnxsim.pruning import apply_structured_pruning, apply_structured_wanda_pruning

    if kind == "structured":
        return apply_structured_pruning(src, sparsity=sparsity)
    return apply_structured_wanda_pruning(src, calibration_data=batches, sparsity=sparsity)


def run_onnxsim(s: bq.Subject, method: str, target: float, tol: float, out: Path) -> dict:
    import onnx
    from onnxsim import apply_pruning_finetune

    kind = ONNXSIM_METHODS[method]
    row = {"family": "onnxsim", "match": f"sparsity bisected on our MACs of the pruned file (tol {tol:g})"}
    dest = out / "pruned" / f"{s.model_name}-seed{s.seed}-{method}-f{target}.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    probe_file = dest.with_suffix(".probe.onnx")
    batches, src = calib_batches(s), str(s.onnx_path)

    def measure(sparsity: float) -> int:
        onnx.save(onnxsim_prune(kind, src, sparsity, batches), str(probe_file))
        return our_macs(probe_file, s.input_shape)

    t0 = time.perf_counter()
    m = bisect_macs(measure, target * s.spa_macs, tol)
    search = time.perf_counter() - t0
    probe_file.unlink(missing_ok=True)
    if m.param is None:
        return {**row, "error": f"n/a ({m.error[:200]})", "probes": len(m.probes)}
    try:
        t1 = time.perf_counter()
        pruned = onnxsim_prune(kind, src, m.param, batches)
        tuned = apply_pruning_finetune(src, pruned, calibration_data=batches)
        seconds = time.perf_counter() - t1
        onnx.save(tuned, str(dest))
        macs = our_macs(dest, s.input_shape)
        acc = bq.onnx_accuracy(dest, s.data.x_test, s.data.y_test)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {**row, "error": f"n/a ({type(e).__name__}: {str(e)[:200]})"}
    return {**row, "macs_ratio": macs / s.spa_macs, "mac_error": macs / (target * s.spa_macs) - 1,
            "sparsity": m.param, "probes": len(m.probes), "accuracy": acc, "time_s": seconds,
            "search_time_s": search}


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> dict:
    """(model, method, target) -> {n, acc, std, macs, time, rss, search, errors} (bench_quality's, plus peak RSS)."""
    return bq.summarize(rows, means=(("time", "time_s"), ("rss", "peak_rss_mb"), ("search", "search_time_s")))


def cell(e: dict | None, notes: dict) -> str:
    if e is None:
        return "–"
    if e["n"]:
        return f"{e['acc']:.2f} ± {e['std']:.2f} [{e['macs']:.3f}]" + (f" (n={e['n']})" if e["n"] != 3 else "")
    note = notes.setdefault(e["errors"][0] if e["errors"] else "no rows", len(notes) + 1)
    return f"n/a [{note}]"


GOALS = [  # (method, target, max drop below unpruned, text) from the "Done when"
    ("default-calib", 0.5, 1.0, "default + 128 calib within 1 pt of unpruned at 50 % removed"),
    ("default-calib", 0.3, 2.5, "default + 128 calib within 2.5 pt at 70 % removed"),
    ("default-datafree", 0.7, 3.0, "default data-free within 3 pt at 30 % removed"),
    ("default-datafree", 0.5, 8.0, "default data-free within 8 pt at 50 % removed"),
]


ALLOCATION_PAIRS = [("default-calib", "uniform+obspa", "128 calib"),
                    ("default-datafree", "uniform+obspa-datafree", "data-free")]


def goal_lines(summ: dict, models: list[str]) -> list[str]:
    lines = ["| model | goal | default | reference | margin | met |", "|---|---|---:|---:|---:|:---:|"]
    for model in models:
        base = summ.get((model, "unpruned", 1.0))
        for method, t, drop, text in GOALS:
            e = summ.get((model, method, t))
            if not (base and base["n"] and e and e["n"]):
                continue
            margin = e["acc"] - (base["acc"] - drop)
            lines.append(f"| {model} | {text} | {e['acc']:.2f} | {base['acc']:.2f} - {drop:g} | {margin:+.2f} | "
                         f"{'yes' if margin >= 0 else 'NO'} |")
        for default, uniform, mode in ALLOCATION_PAIRS:
            for t in sorted({k[2] for k in summ if k[0] == model and k[1] == uniform}, reverse=True):
                d, u = summ.get((model, default, t)), summ.get((model, uniform, t))
                if d and u and d["n"] and u["n"]:
                    margin = d["acc"] - u["acc"] + 0.3
                    lines.append(f"| {model} | default allocation never > 0.3 pt below uniform+obspa, {mode} (keep "
                                 f"{t:g}) | {d['acc']:.2f} | {u['acc']:.2f} - 0.3 | {margin:+.2f} | "
                                 f"{'yes' if margin >= 0 else 'NO'} |")
            d, u = summ.get((model, default, 0.3)), summ.get((model, uniform, 0.3))
            if d and u and d["n"] and u["n"]:
                margin = d["acc"] - (u["acc"] + 1.0)
                lines.append(f"| {model} | default allocation ≥ 1 pt above uniform+obspa at 70 % removed, {mode} "
                             f"(needed on 2 nets) | {d['acc']:.2f} | {u['acc']:.2f} + 1 | {margin:+.2f} | "
                             f"{'yes' if margin >= 0 else 'no'} |")
    return lines


def markdown(res: bq.Results, tol: float) -> str:
    rows = list(res.rows.values())
    summ = summarize(rows)
    lines = ["# Quality by default (issue 16): the default command beside explicit modes and peers", "",
             "Generated by `tools/bench_default.py` from `results.json`. Commands that produced these rows:", ""]
    lines += [f"- `{r['command']}` ({r['date']}; {r['versions']})" for r in res.runs]
    lines += ["", ("Cells: test accuracy in % (onnxruntime), mean ± std over seeds (n = 3 unless shown), in brackets "
                   "the fraction of MACs actually kept by our cost model. Time: mean seconds (ours: the whole CLI "
                   "process; TP: final prune + BN re-estimation; onnxsim: final prune + apply_pruning_finetune), in "
                   "brackets the MACs-matching search; peak RSS of our CLI process in MB. MACs matching: "
                   f"Torch-Pruning's pruning_ratio bisected on torch MACs to within {100 * tol:g} %, onnxsim's "
                   f"sparsity bisected on our cost model's MACs of its output file to within {100 * tol:g} %; the "
                   "closest probe where none gets that close. No fine-tuning anywhere."), ""]
    models = [m for m in BENCH_MODELS if any(k[0] == m for k in summ)]
    notes: dict[str, int] = {}
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    for model in models:
        targets = sorted({k[2] for k in summ if k[0] == model and k[1] != "unpruned"}, reverse=True)
        base = summ.get((model, "unpruned", 1.0))
        head = f"## {model}"
        if base and base["n"]:
            head += f" (unpruned {base['acc']:.2f} ± {base['std']:.2f} %, n={base['n']})"
        lines += [head, "", "| method | " + " | ".join(f"{100 * (1 - t):.0f} % removed (keep {t:g})" for t in targets)
                  + " | time (s) | peak RSS (MB) |", "|---|" + "---:|" * (len(targets) + 2)]
        methods = sorted({k[1] for k in summ if k[0] == model and k[1] != "unpruned"},
                         key=lambda m: (order.get(m, len(order)), m))
        for method in methods:
            es = [summ.get((model, method, t)) for t in targets]
            ok = [e for e in es if e and e["n"]]
            times = [e["time"] for e in ok if e.get("time") is not None]
            searches = [e["search"] for e in ok if e.get("search") is not None]
            rss = [e["rss"] for e in ok if e.get("rss") is not None]
            t_cell = (f"{statistics.fmean(times):.2f}" if times else "–") + (
                f" ({statistics.fmean(searches):.1f})" if searches else "")
            lines.append(f"| {method} | " + " | ".join(cell(e, notes) for e in es) + f" | {t_cell} | "
                         + (f"{max(rss):.0f}" if rss else "–") + " |")
        lines.append("")
    if notes:
        lines += ["Not available / errors:", ""] + [f"{i}. {msg[:300]}" for msg, i in notes.items()] + [""]
    for fam in ("tp", "onnxsim"):
        errs = [abs(r["mac_error"]) for r in rows if r.get("family") == fam and r.get("mac_error") is not None]
        if errs:
            within = sum(e <= tol + 1e-12 for e in errs)
            lines += [f"MACs matching of {fam}: {within}/{len(errs)} rows within {100 * tol:g} % of the target; "
                      f"median |error| {100 * statistics.median(errs):.2f} %, max {100 * max(errs):.2f} %.", ""]
    lines += ["## The issue's accuracy goals, checked against these rows", "", *goal_lines(summ, models), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help=f"'all' or some of {', '.join(BENCH_MODELS)} (default: {' '.join(DEFAULT_MODELS)})")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--targets", "--target-flops", nargs="+", type=float, default=[0.7, 0.5, 0.3],
                    help="fractions of MACs to keep")
    ap.add_argument("--methods", nargs="+", default=["all"], help=f"'all' or some of {', '.join(ALL_METHODS)}")
    ap.add_argument("--mac-tol", type=float, default=0.01, help="relative MACs tolerance of the peers' bisection")
    ap.add_argument("--quick", action="store_true", help="resnet20_digits, seed 0, keep 0.5, into OUT/quick")
    ap.add_argument("--resume", action="store_true", help="keep results.json's rows; skip rows measured without error")
    ap.add_argument("--render", action="store_true", help="measure nothing: rewrite results.md from results.json")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.targets, args.out = ["resnet20_digits"], [0], [0.5], args.out / "quick"
    args.models = list(BENCH_MODELS) if args.models == ["all"] else args.models
    args.methods = ALL_METHODS if args.methods == ["all"] else args.methods
    for m in args.models:
        if m not in BENCH_MODELS:
            ap.error(f"unknown model {m!r}")
    for m in args.methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}; choose from {ALL_METHODS}")
    return args


def describe(row: dict) -> str:
    if row.get("error"):
        return row["error"][:200]
    extra = f", search {row['search_time_s']:.1f} s" if row.get("search_time_s") is not None else ""
    return f"acc {row['accuracy']:.4f}, MACs kept {row['macs_ratio']:.4f}, {row['time_s']:.2f} s{extra}"


def bench_subject(s: bq.Subject, args, res: bq.Results) -> None:
    base = {"model": s.model_name, "seed": s.seed}
    res.add(dict(base, method="unpruned", family="baseline", target=1.0, macs_ratio=1.0, accuracy=s.onnx_acc,
                 spa_macs=s.spa_macs, torch_macs=s.torch_macs))
    tp = {m: TPVariant(s, scope) for m, scope in TP_METHODS.items() if m in args.methods}
    for target in args.targets:
        for method in args.methods:
            if res.done(s.model_name, s.seed, method, target):
                continue
            if method in OUR_METHODS:
                row = run_ours(s, method, target, args.out)
            elif method in TP_METHODS:
                row = run_tp(s, tp[method], method, target, args.mac_tol, args.out)
            else:
                row = run_onnxsim(s, method, target, args.mac_tol, args.out)
            res.add(dict(base, method=method, target=target, **row))
            log(f"  {s.model_name} s{s.seed} keep {target:g}: {method}: {describe(row)}")
            res.save()


def main(argv=None) -> int:
    import torch

    args = parse(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    res = bq.Results(args.out / "results.json", args.resume or args.render)
    if not args.render:
        command = shlex.join(["python", "tools/bench_default.py", *(sys.argv[1:] if argv is None else argv)])
        res.runs.append({"command": command, "date": datetime.datetime.now(datetime.timezone.utc)
                         .strftime("%Y-%m-%d %H:%M UTC"), "versions": bq.versions(("onnxsim",)), "cpus": os.cpu_count()})
        log(f"{command}\n  models {args.models}, seeds {args.seeds}, targets {args.targets}, methods {args.methods}")
        t0 = time.perf_counter()
        for model_name in args.models:
            for seed in args.seeds:
                bench_subject(bq.prepare(model_name, seed, args.out, keep_bn=False), args, res)
                res.save()
        log(f"done in {time.perf_counter() - t0:.0f} s")
    md = markdown(res, args.mac_tol)
    (args.out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
