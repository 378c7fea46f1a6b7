"""Time OBSPA on ResNet-50 (a benchmark, not a test).

    python tools/bench_obspa.py [--samples 128] [--model resnet50] [--target-flops 0.5]

Runs, in a fresh process, `spa-prune zoo:MODEL OUT --target-flops F --importance obspa --calib CALIB.npz` with
CALIB = N samples at the model's input size (standard-normal pixels in the normalized input space: the timing
does not depend on the image content), and prints a markdown table: whole-process wall time, peak memory, and
the report's breakdown (scoring pass: forward / Hessians / solves; reconstruction pass: forward / Hessians /
solves; verification; fidelity). All numbers come from this run.
"""
from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--out", default=str(ROOT / ".bench" / "obspa"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from spa import models

    path = models.zoo_path(args.model)
    shape = models._spec(args.model).shape
    calib = out / f"calib_{args.model}_{args.samples}.npz"
    if not calib.exists():
        rng = np.random.default_rng(0)
        np.savez(calib, input=rng.standard_normal((args.samples, *shape[1:])).astype(np.float32))
    report = out / f"{args.model}_obspa_report.json"
    cmd = [sys.executable, "-m", "spa.cli", str(path), str(out / f"{args.model}_obspa.onnx"),
           "--target-flops", str(args.target_flops), "--importance", "obspa", "--calib", str(calib),
           "--report", str(report), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    if proc.returncode != 0:
        print(proc.stderr)
        return proc.returncode
    rep = json.loads(report.read_text())
    imp = rep["importance"]
    rec = rep["reconstruction"]
    refit = next(p for p in rec["passes"] if p["pass"].startswith("obspa"))
    t = rep["timings_s"]
    rows = [
        ("whole process (wall)", wall),
        ("load + normalize", t.get("load+normalize")),
        ("analyse", t.get("analyse")),
        ("score + select (total)", t.get("score+select")),
        ("  scoring pass: forward", imp["obspa_timings_s"]["forward_s"]),
        ("  scoring pass: Hessians (patch sampling + XᵀX)", imp["obspa_timings_s"]["hessian_s"]),
        ("  scoring pass: solves (H⁻¹, saliencies)", imp["obspa_timings_s"]["solve_s"]),
        ("apply", t.get("apply")),
        ("verify (structural, onnxruntime)", t.get("verify")),
        ("reconstruct (total, incl. fidelity before/after)", t.get("reconstruct")),
        ("  lockstep forward (original + pruned)", refit["timings_s"]["forward_s"]),
        ("  Hessians / cross terms", refit["timings_s"]["hessian_s"]),
        ("  solves", refit["timings_s"]["solve_s"]),
    ]
    print(f"Command: `{shlex.join(cmd).replace(str(ROOT) + '/', '')}`\n")
    print(f"{args.model}, {args.samples} calibration samples at {'x'.join(map(str, shape[1:]))}, "
          f"{imp['hessian_data']['positions_per_layer']} positions per layer; MACs ratio "
          f"{rep['macs']['ratio']:.3f}; {refit['layers_refit']} layers refit; peak RSS {peak_gb:.1f} GB\n")
    print("| stage | seconds |\n|---|---|")
    for name, v in rows:
        print(f"| {name} | {'n/a' if v is None else f'{v:.1f}'} |")
    for name, after in rec["fidelity_after"].items():
        before = rec["fidelity_before"][name]
        print(f"\nFidelity on the calibration data, output '{name}': rel. L2 {before['rel_l2']:.3f} -> "
              f"{after['rel_l2']:.3f}" + (f", top-1 agreement {before['top1']:.1%} -> {after['top1']:.1%}"
                                          if "top1" in after else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
