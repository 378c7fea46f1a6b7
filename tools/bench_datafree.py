"""Data-free pruning quality: the synthesized inputs (noise vs model inversion) behind OBS + reconstruction.

    python tools/bench_datafree.py                                   # every net with trained weights, seeds 0 1 2
    python tools/bench_datafree.py --nets resnet20_digits --seeds 0 --methods noise inversion

For each trained benchmark net (tools/train_bench.py weights under .bench/quality/, BN folded in the export),
seed, method and fraction F of MACs kept: `spa.driver.prune(onnx, out, target_flops=F, importance="obspa",
allocation="uniform", calib=None, seed=seed)` with spa.synthesis configured by the method, test accuracy in
onnxruntime. The synthesis time is timed on its own (spa.synthesis.model_data, once per net/seed/method).
Methods: "noise" (no inversion: white + smooth noise), "inversion" (the default), "calib" (128 train samples,
the reference), "inversion-standardized" (the inputs' range not read: taken as standardized). Prints a markdown
table (mean over seeds, per-seed values in the JSON written to --out).

`--pixels`: each net takes raw [0, 1] pixels instead of standardized ones, as a net trained without a
normalization step would: the train-set standardization is folded into the first Conv (weights / std, bias -
mean / std x their sum; zero padding then pads raw 0, the background the training's shifts padded with), and the
test and calibration data are un-standardized. The unpruned accuracy is that of the folded net.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

NETS = ("resnet1d_mnist1d", "resnet20_digits", "mobilenetv2_digits", "resnet56_digits")
METHODS = {"noise": {"INVERSION_STEPS": 0}, "inversion": {}, "calib": None,  # spa.synthesis constants per method
           "inversion-40": {"INVERSION_STEPS": 40, "INVERSION_BUDGET_MACS": 3e11},
           "inversion-smooth100": {"SMOOTHNESS": (1.0, 100.0)},
           # the inputs taken as standardized whatever the first layer says (before the range was read)
           "inversion-standardized": {"STANDARDIZED": (float("inf"), float("inf"))},
           "inversion-pink": {"NOISE": ("pink", "pink")}}  # every sample starts from 1/f noise


@contextlib.contextmanager
def remembered_inversions():
    """spa.synthesis.invert answering a repeated call (same model, noise, seed, steps, constants) from memory: every
    target of one net/seed/method runs the same deterministic inversion, once."""
    import hashlib

    from spa import synthesis

    original, memory = synthesis.invert, {}

    def invert(g, feeds, inputs, steps, ranges=None):
        digest = hashlib.sha1(g.model.SerializeToString())
        for k in sorted(feeds):
            digest.update(feeds[k].tobytes())
        key = (digest.hexdigest(), inputs.seed, steps, synthesis.SMOOTHNESS, synthesis.INVERSION_LR,
               tuple(sorted((ranges or {}).items())))
        if key not in memory:
            memory[key] = original(g, feeds, inputs, steps, ranges)
        return {k: v.copy() for k, v in memory[key].items()}

    synthesis.invert = invert
    try:
        yield
    finally:
        synthesis.invert = original


@contextlib.contextmanager
def configured(method: str):
    """spa.synthesis's module constants set for `method`, restored afterwards."""
    from spa import synthesis

    changes = METHODS[method] or {}
    saved = {k: getattr(synthesis, k) for k in changes}
    for k, v in changes.items():
        setattr(synthesis, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(synthesis, k, v)


def synthesis_seconds(s, seed: int, samples: int) -> tuple[float, float]:
    """Seconds to synthesize the samples, and seconds of one torch forward pass over them (the unit of cost that
    does not depend on the machine's load as much)."""
    import torch

    import spa
    from spa.importance import ScoreInputs
    from spa.synthesis import model_data
    from spa.torch_graph import TorchGraph

    analysis = spa.analyse(spa.load(str(s.onnx_path), {"input": (1, *s.input_shape)}))
    t0 = time.perf_counter()
    feeds, _ = model_data(ScoreInputs(analysis, None, samples=samples, seed=seed))
    synth = time.perf_counter() - t0
    tg = TorchGraph(analysis.ctx.g)
    with torch.no_grad():
        t0 = time.perf_counter()
        tg.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    return synth, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=list(NETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["noise", "inversion"], choices=list(METHODS))
    ap.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "datafree")
    ap.add_argument("--pixels", action="store_true", help="nets taking [0, 1] pixels (see the module's doc)")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with remembered_inversions():
        measure(args, rows)
    report(args, rows)
    return 0


def measure(args, rows: list) -> None:
    from spa import driver
    from tools import bench_quality as bq
    from tools import train_bench

    for net in args.nets:
        for seed in args.seeds:
            if not train_bench.cache_paths(net, seed)[0].exists():
                print(f"skip {net} seed {seed}: no trained weights", file=sys.stderr)
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                s = bq.prepare(net, seed, args.out, keep_bn=False)
            if args.pixels:
                s = on_pixels(s, args.out)
            for method in args.methods:
                with configured(method):
                    synth, forward = (0.0, 0.0) if method == "calib" else synthesis_seconds(s, seed, args.samples)
                    accs = []
                    for target in args.targets:
                        dest = args.out / f"{net}-seed{seed}-{method}-f{target}.onnx"
                        calib = str(s.calib_path) if method == "calib" else None
                        with contextlib.redirect_stdout(io.StringIO()):
                            driver.prune(str(s.onnx_path), str(dest), target_flops=target, importance="obspa",
                                         allocation="uniform", calib=calib, samples=args.samples, seed=seed,
                                         input_shapes={"input": (1, *s.input_shape)})
                        accs.append(100 * bq.onnx_accuracy(dest, s.data.x_test, s.data.y_test))
                row = {"net": net, "seed": seed, "method": method, "unpruned": 100 * s.onnx_acc,
                       "acc": dict(zip(map(str, args.targets), accs)), "synthesis_s": synth, "forward_s": forward}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)


def on_pixels(s, out: Path):
    """The prepared net `s` taking raw pixels: the data's standardization folded into the first Conv (see the
    module's doc); test and calibration data un-standardized; the unpruned accuracy measured again."""
    import onnx
    from onnx import numpy_helper

    from tools import bench_quality as bq

    model = onnx.load(str(s.onnx_path))
    weights = {t.name: t for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[0] == model.graph.input[0].name)
    w = numpy_helper.to_array(weights[conv.input[1]])
    b = numpy_helper.to_array(weights[conv.input[2]])
    mean, std = s.data.mean, s.data.std
    weights[conv.input[1]].CopyFrom(numpy_helper.from_array((w / std).astype(np.float32), conv.input[1]))
    weights[conv.input[2]].CopyFrom(numpy_helper.from_array(
        (b - mean / std * w.sum(axis=tuple(range(1, w.ndim)))).astype(np.float32), conv.input[2]))
    path = out / f"{s.onnx_path.stem}-pixels.onnx"
    onnx.save(model, str(path))
    calib = dict(np.load(s.calib_path))
    calib["input"] = (calib["input"] * std + mean).astype(np.float32)
    calib_path = out / f"{s.calib_path.stem}-pixels.npz"
    np.savez(calib_path, **calib)
    data = s.data._replace(x_train=(s.data.x_train * std + mean).astype(np.float32),
                           x_test=(s.data.x_test * std + mean).astype(np.float32))
    acc = bq.onnx_accuracy(path, data.x_test, data.y_test)
    return dataclasses.replace(s, onnx_path=path, calib_path=calib_path, data=data, onnx_acc=acc)


def report(args, rows: list) -> None:
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"load average {os.getloadavg()[0]:.1f}; command: python tools/bench_datafree.py "
          + " ".join(sys.argv[1:]))
    print("| net | method | seeds | unpruned | " + " | ".join(f"keep {t}" for t in args.targets)
          + " | synthesis s (median) | synthesis / one forward |")
    print("|---|---|---|---|" + "---|" * len(args.targets) + "---|---|")
    for net in args.nets:
        for method in args.methods:
            sel = [r for r in rows if r["net"] == net and r["method"] == method]
            if not sel:
                continue
            accs = [np.mean([r["acc"][str(t)] for r in sel]) for t in args.targets]
            print(f"| {net} | {method} | {len(sel)} | {np.mean([r['unpruned'] for r in sel]):.2f} | "
                  + " | ".join(f"{a:.2f}" for a in accs)
                  + f" | {np.median([r['synthesis_s'] for r in sel]):.1f}"
                  + f" | {np.median([r['synthesis_s'] / max(r.get('forward_s', 0), 1e-9) for r in sel]):.0f} |")


if __name__ == "__main__":
    raise SystemExit(main())
