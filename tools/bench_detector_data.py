"""Data-free pruning of a text detector: does it help to feed natural images instead of noise? (issue 16, item 3)

    pip download scikit-image==0.26.0 --no-deps -d /tmp/sk && mkdir -p IMAGES && \
        unzip -o -q -j /tmp/sk/scikit_image-*.whl 'skimage/data/*.png' 'skimage/data/*.jpg' -d IMAGES
    python tools/bench_detector_data.py ch_PP-OCRv4_det_infer.onnx IMAGES --out .bench/detector

The detector (PP-OCRv4's, input `x`, a sigmoid text-probability map out) is pruned to --target-flops (default 0.5)
three ways: `--fast`, the default data-free command (synthesized inputs: noise at this size), and the default
command with --calib = 64 crops of twelve natural images (astronaut, coffee, ...; ImageNet normalization, the
detector's own preprocessing). Each pruned model is then compared with the original on 20 crops of ten OTHER
images, among them scikit-image's two text pages: relative L2 error of the map and the IoU of its text pixels
(map > 0.3, the detector's own threshold). A benchmark, not a test; the images are scikit-image's bundled data.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
FIT = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "coins.png", "camera.png",
       "brick.png", "logo.png", "color.png", "grass.png", "horse.png"]
HELD_OUT = ["page.png", "text.png", "clock_motion.png", "moon.png", "retina.jpg", "hubble_deep_field.jpg",
            "motorcycle_right.png", "cell.png", "gravel.png", "ihc.png"]


def crops(folder: Path, names: list[str], n: int, size: int, seed: int, mean=MEAN, std=STD) -> np.ndarray:
    """n square crops (half to all of the shorter side) resized to size², RGB in [0, 1] normalized by mean and std
    (ImageNet's by default), NCHW."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [np.asarray(Image.open(folder / name).convert("RGB")) for name in names]
    out = []
    for i in range(n):
        im = images[i % len(images)]
        h, w = im.shape[:2]
        side = int(rng.uniform(0.5, 1.0) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(im[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        out.append(((np.asarray(crop, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def outputs(path: Path, x: np.ndarray, name: str, batch: int = 4) -> np.ndarray:
    """The model's first output over x, `batch` samples per run."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("images", help="a folder with scikit-image's bundled images")
    ap.add_argument("--input", default="x")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--target-flops", default="0.5")
    ap.add_argument("--out", default=".bench/detector")
    args = ap.parse_args()
    out, images = Path(args.out), Path(args.images)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "calib.npz", **{args.input: crops(images, FIT, 64, args.size, 0)})
    held_out = crops(images, HELD_OUT, 20, args.size, 1)
    reference = outputs(Path(args.model), held_out, args.input)
    runs = {"fast": ["--fast"], "data-free (default)": [], "natural-image calib": ["--calib", str(out / "calib.npz")]}
    rows = []
    for label, extra in runs.items():
        pruned = out / (label.split()[0] + ".onnx")
        cmd = [sys.executable, "-m", "spa.cli", args.model, str(pruned), "--target-flops", args.target_flops,
               "--input-shape", f"{args.input}=1,3,{args.size},{args.size}", "--report",
               str(pruned.with_suffix(".json")), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        if proc.returncode:
            rows.append({"run": label, "exit": proc.returncode, "error": proc.stderr.strip()[-300:]})
            print(rows[-1], flush=True)
            continue
        got = outputs(pruned, held_out, args.input)
        text, text_ref = got > 0.3, reference > 0.3
        rows.append({"run": label, "exit": 0,
                     "rel_l2": float(np.linalg.norm(got - reference) / np.linalg.norm(reference)),
                     "text_iou": float((text & text_ref).sum() / max((text | text_ref).sum(), 1)),
                     "text_fraction_original": float(text_ref.mean()),
                     "time_s": json.loads(pruned.with_suffix(".json").read_text())["timings_s"]["total"]})
        print(rows[-1], flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
