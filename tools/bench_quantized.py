"""Quantized models through the default command: the quality benchmark's trained nets quantized by onnxruntime's own
quantizer, pruned by `spa-prune IN OUT --target-flops F` (data-free, and with the 128 calibration samples), test
accuracy in onnxruntime beside the float model pruned the same way.

    python tools/bench_quantized.py --models resnet20_digits mobilenetv2_digits --seeds 0 --targets 0.5 0.3
    python tools/bench_quantized.py --transformers vit_digits char_lm --removed 0.3 0.5 --forms float dynamic

A benchmark, not a test. Per trained net and seed (`tools.bench_quality.prepare`: BN folded, cached under
.bench/quality/): the float export, `quantize_static` in QDQ form (int8 weights per channel, uint8 activations,
calibrated on the 128 calibration samples) and in QOperator form (QLinearConv / QGemm), and `quantize_dynamic`
(ConvInteger / MatMulInteger); each pruned through the CLI in a subprocess, as a user runs it. Rows go to
--out/results.json and a table to --out/results.md.

`--transformers`: the trained transformers of `tools/bench_transformers.py` (a ViT on digits: test accuracy; a
byte-level GPT with GQA and rotary: held-out perplexity), in float and `quantize_dynamic` form (MatMulInteger, how
transformers are usually quantized), pruned through `spa.driver.prune` by `--removed` of their head+MLP MACs as
that benchmark does, with the 128 calibration samples and data-free.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import bench_quality as bq  # noqa: E402

FORMS = ("float", "qdq", "qoperator", "dynamic")
MODES = ("datafree", "calib")


def quantized(s, out: Path) -> dict[str, Path]:
    """The float export and its three quantized forms (cached)."""
    from onnxruntime import quantization as qz
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.ERROR)
    base = out / f"{s.model_name}-seed{s.seed}"
    paths = {"float": s.onnx_path, **{f: Path(f"{base}-{f}.onnx") for f in FORMS[1:]}}
    if all(p.exists() for p in paths.values()):
        return paths
    pre = Path(f"{base}-pre.onnx")
    quant_pre_process(str(s.onnx_path), str(pre))

    class Reader(qz.CalibrationDataReader):
        def __init__(self):
            self.it = iter({"input": s.calib_x[i:i + 1]} for i in range(len(s.calib_x)))

        def get_next(self):
            return next(self.it, None)

    for form, fmt in (("qdq", qz.QuantFormat.QDQ), ("qoperator", qz.QuantFormat.QOperator)):
        qz.quantize_static(str(pre), str(paths[form]), Reader(), quant_format=fmt, per_channel=True,
                           weight_type=qz.QuantType.QInt8, activation_type=qz.QuantType.QUInt8)
    qz.quantize_dynamic(str(pre), str(paths["dynamic"]), weight_type=qz.QuantType.QInt8)
    return paths


def run_one(s, path: Path, form: str, mode: str, target: float, out: Path) -> dict:
    dest = out / f"{path.stem}-{mode}-{target}.onnx"
    cmd = [sys.executable, "-m", "spa.cli", str(path), str(dest), "--target-flops", str(target), "--quiet",
           "--input-shape", "input=" + ",".join(map(str, (1, *s.input_shape))), "--report", f"{dest}.json"]
    if mode == "calib":
        cmd += ["--calib", str(s.calib_path)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"model": s.model_name, "seed": s.seed, "form": form, "mode": mode, "target": target,
           "time_s": round(time.perf_counter() - t, 2), "exit": proc.returncode,
           "command": " ".join(["spa-prune", path.name, dest.name, *cmd[5:]])}
    if proc.returncode == 0:
        rep = json.loads(Path(f"{dest}.json").read_text())
        row["test_acc"] = 100 * bq.onnx_accuracy(str(dest), s.data.x_test, s.data.y_test, batch=1)
        row["macs_ratio"] = rep["macs"]["ratio"]
        row["warnings"] = len(rep.get("warnings", []))
    else:
        row["error"] = proc.stderr.strip().splitlines()[-1:] or ["?"]
    return row


def table(rows: list[dict], unpruned: dict) -> str:
    lines = ["| net | form (unpruned %) | mode | " + " | ".join(f"keep {t}" for t in sorted({r['target'] for r in rows},
                                                                                    reverse=True)) + " |"]
    targets = sorted({r["target"] for r in rows}, reverse=True)
    lines.append("|---|---|---|" + "---|" * len(targets))
    for model in dict.fromkeys(r["model"] for r in rows):
        for form in FORMS:
            for mode in MODES:
                cells = []
                for t in targets:
                    vals = [r.get("test_acc") for r in rows if (r["model"], r["form"], r["mode"], r["target"])
                            == (model, form, mode, t)]
                    ok = [v for v in vals if v is not None]
                    cells.append(f"{statistics.mean(ok):.2f}" if ok and len(ok) == len(vals) else
                                 ("exit≠0" if vals else "-"))
                un = statistics.mean(unpruned[(model, form)])
                lines.append(f"| {model} | {form} ({un:.2f}) | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def transformer_rows(name: str, seed: int, removed: list[float], forms: list[str], out: Path) -> list[dict]:
    from onnxruntime import quantization as qz

    from spa import driver
    from tools import bench_transformers as bt

    logging.getLogger().setLevel(logging.ERROR)
    s = bt.prepare(name, seed, out / "transformers")
    paths = {"float": s.onnx_path, "dynamic": out / f"{name}-seed{seed}-dynamic.onnx"}
    if "dynamic" in forms and not paths["dynamic"].exists():
        qz.quantize_dynamic(str(s.onnx_path), str(paths["dynamic"]), weight_type=qz.QuantType.QInt8)
    rows = []
    for form in [f for f in forms if f in paths]:
        base = {"model": name, "seed": seed, "form": form, "unpruned": bt.onnx_metric(s, paths[form])}
        for mode in MODES:
            for r in removed:
                dest = out / f"{name}-seed{seed}-{form}-{mode}-r{r}.onnx"
                kwargs = {"target_flops": bt.keep_fraction(s, r), "input_shapes": {s.input_name: s.input_shape}}
                if mode == "calib":
                    kwargs["calib"] = str(s.calib_path)
                t = time.perf_counter()
                rep = driver.prune(str(paths[form]), str(dest), **kwargs).report
                rows.append({**base, "mode": mode, "removed": r, "time_s": round(time.perf_counter() - t, 2),
                             "metric": bt.onnx_metric(s, dest), "macs_ratio": rep["macs"]["ratio"],
                             "as_qdq": rep["normalize"].get("integer_kernels_as_qdq")})
                print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20_digits", "mobilenetv2_digits"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    p.add_argument("--out", default=str(ROOT / ".bench" / "quantized"))
    p.add_argument("--transformers", nargs="+", default=[], choices=["vit_digits", "char_lm"],
                   help="instead of --models: the trained transformers, --removed of their head+MLP MACs")
    p.add_argument("--removed", nargs="+", type=float, default=[0.3, 0.5])
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.transformers:
        rows = [r for name in a.transformers for seed in a.seeds
                for r in transformer_rows(name, seed, a.removed, a.forms, out)]
        (out / "transformers.json").write_text(json.dumps(rows, indent=1, default=str))
        return 0
    rows, unpruned = [], {}
    for model in a.models:
        for seed in a.seeds:
            s = bq.prepare(model, seed, ROOT / ".bench" / "quality", keep_bn=False)
            paths = quantized(s, out)
            for form in a.forms:
                acc = 100 * bq.onnx_accuracy(str(paths[form]), s.data.x_test, s.data.y_test, batch=1)
                unpruned.setdefault((model, form), []).append(acc)
                for mode in MODES:
                    for target in a.targets:
                        r = run_one(s, paths[form], form, mode, target, out)
                        print(json.dumps(r), flush=True)
                        rows.append(r)
                        (out / "results.json").write_text(json.dumps(rows, indent=1))
    cmd = "python tools/bench_quantized.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.md").write_text(f"`{cmd}`\n\n" + table(rows, unpruned))
    print(table(rows, unpruned))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
