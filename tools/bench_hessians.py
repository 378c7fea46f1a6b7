"""Exact OBS Hessians against the factored ones (`--exact-hessians` vs the default) on trained third-party convnets.

    python tools/bench_hessians.py ~/.cache/spa-prune/wheels/nudenet-3.4.2/nudenet/320n.onnx:images:320 \
        ~/.cache/spa-prune/wheels/ddddocr-1.6.1/ddddocr/common_det.onnx:images:416 --keeps 0.7 0.5 0.3

A benchmark, not a test. Each MODEL:INPUT:SIZE (square RGB input, pixels scaled to [0, 1]: the YOLO exports'
preprocessing) is pruned with the plain command and 64 crops of twelve scikit-image pictures as --calib
(`tools/bench_detector_data.py`'s FIT list; --images: the folder its docstring makes from scikit-image's wheel,
by default ~/.cache/spa-prune/skimage), once as is (wide convs
scored on Kronecker factors, spa/obspa.py) and once with --exact-hessians, at each --keeps fraction of the MACs and
each --seeds sampling seed. Each pruned model is compared with the original on 20 crops of ten OTHER pictures
(relative L2 error of the first output, which is what a detector's boxes and scores come from); time and peak RSS
are the whole process. Prints a markdown table, also written to OUT/results.md and OUT/results.json.

`--variant LABEL=ARGS` (repeatable) replaces the two variants with others, e.g. the sampled positions:

    python tools/bench_hessians.py MODEL:images:320 --variant "8192=" --variant "4096=--positions 4096"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python tools/bench_hessians.py`
    sys.path.insert(0, str(ROOT))

import numpy as np

from tools.bench_default import run_subprocess
from tools.bench_detector_data import FIT, HELD_OUT, crops, outputs

IMAGES = Path.home() / ".cache" / "spa-prune" / "skimage"
VARIANTS = {"factored (default)": [], "exact": ["--exact-hessians"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="PATH:INPUT:SIZE")
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--images", type=Path, default=IMAGES, help="scikit-image's bundled pictures")
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "hessians")
    ap.add_argument("--variant", action="append", metavar="LABEL=ARGS",
                    help="a variant to run (extra CLI arguments after '='); default: factored and --exact-hessians")
    args = ap.parse_args(argv)
    variants = VARIANTS
    if args.variant:
        variants = {label: extra.split() for label, extra in (v.split("=", 1) for v in args.variant)}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.models:
        path, name, size = spec.rsplit(":", 2)
        size = int(size)
        calib = args.out / f"calib-{size}.npz"
        np.savez(calib, **{name: crops(args.images, FIT, 64, size, 0, mean=0.0, std=1.0)})
        held_out = crops(args.images, HELD_OUT, 20, size, 1, mean=0.0, std=1.0)
        reference = outputs(Path(path), held_out, name, batch=1)
        for keep in args.keeps:
            for seed in args.seeds:
                for i, (label, extra) in enumerate(variants.items()):
                    stem = args.out / f"{Path(path).stem}-{keep:g}-s{seed}-v{i}"
                    argv_ = [sys.executable, "-m", "spa.cli", path, f"{stem}.onnx", "--target-flops", f"{keep:g}",
                             "--calib", str(calib), "--input-shape", f"{name}=1,3,{size},{size}", "--seed",
                             str(seed), *extra]
                    rc, seconds, rss = run_subprocess(argv_, stem.with_suffix(".log"))
                    row = {"model": Path(path).name, "keep": keep, "seed": seed, "hessians": label, "exit": rc,
                           "time_s": round(seconds, 1), "peak_rss_mb": round(rss)}
                    if rc == 0:
                        got = outputs(Path(f"{stem}.onnx"), held_out, name, batch=1)
                        row["rel_l2"] = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    lines = ["| model | MACs kept | seed | hessians | rel. L2 error on 20 held-out crops | time (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['keep']:g} | {r['seed']} | {r['hessians']} | "
              f"{r.get('rel_l2', float('nan')):.4f} | {r['time_s']} | {r['peak_rss_mb']} |" for r in rows]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
