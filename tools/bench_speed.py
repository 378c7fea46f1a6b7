"""Is the default fast enough? (issue 16, item 5) spa-prune's whole process against the floor of any data-driven
method: onnxruntime running the UNPRUNED model once over the same samples.

    python tools/bench_speed.py MODEL.onnx --input-shape input=1,3,224,224 --calib-samples 128 --repeats 2
    python tools/bench_speed.py det.onnx --input-shape x=1,3,640,640 --modes datafree

A benchmark, not a test. In ONE process, interleaved (floor, ours, floor, ours, ... per mode and repeat):

* floor: onnxruntime (2 intra-op threads, one session) running the unpruned model over the same N samples, in
  batches of --floor-batch (session creation included): the data-free mode's N = --samples random normal inputs
  (spa-prune synthesizes its own; only their number matters for timing), the calibration mode's N = the
  calibration set (--calib FILE, or --calib-samples N smooth random images written to OUT).
* ours: `python -m spa.cli MODEL OUT.onnx --target-flops F
  --input-shape ... [--calib C.npz] --report R.json` (--cli-args replaces the arguments after --target-flops),
  in a subprocess; wall time and peak RSS of the whole process through the small intermediary of
  tools/bench_default (`run_subprocess`).

Prints, per mode, the medians, the ratio ours / floor, peak RSS and the per-stage breakdown from the report
(stage timings; the OBS scoring pass and the reconstruction pass: forward / Hessians / solves), as a markdown
table; also written to OUT/speed.md and OUT/speed.json. Set OMP_WAIT_POLICY=PASSIVE (done here for children) and
state the load average (printed) with the numbers: the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python tools/bench_speed.py`
    sys.path.insert(0, str(ROOT))

import numpy as np

from tools.bench_default import run_subprocess

DEFAULT_OUT = ROOT / ".bench" / "speed"
DEFAULT_CLI: list[str] = []   # the default command, as a user types it


def parse_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    name, dims = spec.split("=", 1)
    return name, tuple(int(d) for d in dims.split(","))


def make_calib(path: Path, name: str, shape: tuple[int, ...], n: int) -> Path:
    """n smooth random images (low-resolution noise upsampled to the input size), normalized like ImageNet's
    inputs: the content does not matter for timing, only the count and size."""
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    c, h, w = shape[1], shape[-2], shape[-1]
    small = rng.random((n, c, max(h // 16, 1), max(w // 16, 1)), dtype=np.float32)
    big = small.repeat(h // small.shape[2] + 1, axis=2)[:, :, :h].repeat(w // small.shape[3] + 1, axis=3)[..., :w]
    x = (big - 0.45) / 0.225
    np.savez(path, **{name: x.reshape(n, *shape[1:]).astype(np.float32)})
    return path


def floor_pass(model: Path, feeds: dict[str, np.ndarray], batch: int) -> tuple[float, float]:
    """(wall, CPU) seconds onnxruntime (2 threads) takes to create a session and run the model once over
    `feeds`. CPU seconds (all threads of this process) are the steadier measure on a shared machine."""
    import onnxruntime as ort

    t0, c0 = time.perf_counter(), time.process_time()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    n = next(iter(feeds.values())).shape[0]
    for start in range(0, n, batch):
        sess.run(None, {k: v[start:start + batch] for k, v in feeds.items()})
    return time.perf_counter() - t0, time.process_time() - c0


def stages(rep: dict) -> dict[str, float]:
    """The report's per-stage seconds, flattened: the top-level stages, scoring pass and reconstruction pass."""
    out = {k: float(v) for k, v in rep.get("timings_s", {}).items()}
    imp = rep.get("importance") or {}
    for k, v in (imp.get("obspa_timings_s") or {}).items():
        out[f"score.{k.removesuffix('_s')}"] = float(v)
    for p in (rep.get("reconstruction") or {}).get("passes", []):
        for k, v in (p.get("timings_s") or {}).items():
            out[f"refit.{k.removesuffix('_s')}"] = float(v)
    return out


def run_ours(args, mode: str, calib: Path | None, out: Path, k: int) -> dict:
    dest, report, log = (out / f"ours-{mode}-{k}{x}" for x in (".onnx", ".json", ".log"))
    report.unlink(missing_ok=True)
    extra = args.cli_args if args.cli_args is not None else DEFAULT_CLI
    argv = [sys.executable, "-m", "spa.cli", str(args.model), str(dest), "--target-flops", f"{args.target_flops:g}",
            *extra, *(a for spec in args.input_shape for a in ("--input-shape", spec)), "--report", str(report)]
    if calib is not None:
        argv += ["--calib", str(calib)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rc, seconds, rss_mb = run_subprocess(argv, log)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the intermediary waited for spa-prune: included
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if rc != 0 or not report.exists():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"spa-prune failed (exit {rc}): {tail[0]}")
    rep = json.loads(report.read_text())
    return {"time_s": seconds, "cpu_s": cpu_s, "peak_rss_mb": rss_mb, "stages": stages(rep), "argv": argv[3:]}


def median_stages(runs: list[dict]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in runs for k in r["stages"])
    return {k: statistics.median(r["stages"].get(k, 0.0) for r in runs) for k in keys}


def markdown(results: dict, load: tuple[float, float, float]) -> str:
    lines = [f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min)", "",
             "| mode | samples | onnxruntime pass: wall / CPU (s) | spa-prune: wall / CPU (s) | ratio: wall / CPU "
             "| peak RSS (MB) | runs |", "|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['samples']} | {r['floor_s']:.2f} / {r['floor_cpu_s']:.2f} | {r['ours_s']:.1f} / "
                     f"{r['cpu_s']:.1f} | {r['ratio']:.1f}x / {r['cpu_ratio']:.1f}x | {r['peak_rss_mb']:.0f} | "
                     f"{len(r['runs'])} |")
    lines += ["", "Per stage (median seconds, from --report):", ""]
    modes = list(results)
    keys = list(dict.fromkeys(k for r in results.values() for k in r["stages"]))
    lines += ["| stage | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{results[m]['stages'].get(k, 0.0):.1f}" for m in modes) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--input-shape", action="append", required=True, help="NAME=d0,d1,... (as for spa-prune)")
    ap.add_argument("--modes", nargs="+", default=["datafree", "calib"], choices=["datafree", "calib"])
    ap.add_argument("--samples", type=int, default=64, help="spa-prune's data-free sample count")
    ap.add_argument("--calib", type=Path, help="a calibration .npz (default: --calib-samples random images)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--cli-args", nargs=argparse.REMAINDER,
                    help="spa-prune arguments after --target-flops (default: none, the default command)")
    ap.add_argument("--floor-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = dict(parse_shape(s) for s in args.input_shape)
    if len(shapes) != 1 and "calib" in args.modes and args.calib is None:
        raise SystemExit("several inputs: pass --calib")
    name, shape = next(iter(shapes.items()))
    calib = None
    if "calib" in args.modes:
        calib = args.calib or make_calib(args.out / f"calib{args.calib_samples}-{'x'.join(map(str, shape[1:]))}.npz",
                                         name, shape, args.calib_samples)
    rng = np.random.default_rng(0)
    feeds = {"datafree": {k: rng.standard_normal((args.samples, *s[1:])).astype(np.float32)
                          for k, s in shapes.items()}}
    if calib is not None:
        with np.load(calib) as z:
            feeds["calib"] = {k: z[k] for k in shapes}
    floors = {m: [] for m in args.modes}
    ours = {m: [] for m in args.modes}
    for k in range(args.repeats):
        for mode in args.modes:
            floors[mode].append(floor_pass(args.model, feeds[mode], args.floor_batch))
            print(f"[speed] {mode} #{k}: onnxruntime pass {floors[mode][-1][0]:.2f} s "
                  f"(CPU {floors[mode][-1][1]:.2f} s)", flush=True)
            ours[mode].append(run_ours(args, mode, calib if mode == "calib" else None, args.out, k))
            print(f"[speed] {mode} #{k}: spa-prune {ours[mode][-1]['time_s']:.1f} s "
                  f"(CPU {ours[mode][-1]['cpu_s']:.1f} s), {ours[mode][-1]['peak_rss_mb']:.0f} MB", flush=True)
    results = {}
    for mode in args.modes:
        floor_s = statistics.median(f[0] for f in floors[mode])
        floor_cpu_s = statistics.median(f[1] for f in floors[mode])
        ours_s = statistics.median(r["time_s"] for r in ours[mode])
        cpu_s = statistics.median(r["cpu_s"] for r in ours[mode])
        results[mode] = {"samples": next(iter(feeds[mode].values())).shape[0], "floor_s": floor_s, "ours_s": ours_s,
                         "ratio": ours_s / floor_s,
                         "floor_cpu_s": floor_cpu_s, "cpu_s": cpu_s, "cpu_ratio": cpu_s / floor_cpu_s, "peak_rss_mb": max(r["peak_rss_mb"] for r in ours[mode]),
                         "stages": median_stages(ours[mode]), "floors": floors[mode], "runs": ours[mode]}
    text = markdown(results, os.getloadavg())
    print(text)
    (args.out / "speed.md").write_text(text + "\n")
    (args.out / "speed.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
