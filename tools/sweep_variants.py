"""The zoo's small models as users pass ONNX files on: exported at old opsets, converted to float16, simplified,
saved by onnxruntime's offline optimizer; each pruned by the plain command (`--target-flops 0.5`, or
`--cli-args`) through the command line.

    python tools/sweep_variants.py [--models resnet18,vit_tiny] [--variants opset9,ort-basic] [--cli-args "..."]

Variants of each zoo model (small, `models.zoo_path`; a variant whose tool is not installed or fails is a row
"not made: ..."):

* `opset7`, `opset9`, `opset11`: torch.onnx's TorchScript exporter at that opset (IR 3 at opset 7, with the
  initializers listed as graph inputs; `Slice` bounds as attributes before opset 10; constant folding off at 7);
* `fp16`, `fp16-io32`: onnxconverter-common's float16 conversion of the TorchScript export, without and with
  `keep_io_types` (float32 inputs and outputs around float16 weights);
* `simplified`: onnxsim's `simplify` of the dynamo export;
* `ort-basic`, `ort-extended`: the TorchScript export as onnxruntime saves it (`optimized_model_filepath`) at
  ORT_ENABLE_BASIC (standard ops, constants shared) and ORT_ENABLE_EXTENDED (contrib ops such as FusedConv);
* `ort-transformers` (BERT and ViT only): the TorchScript export as onnxruntime's transformer optimizer saves it
  (`onnxruntime.transformers.optimizer.optimize_model`: EmbedLayerNormalization, SkipLayerNormalization, ...);
* `qdq`, `qoperator`, `dynamic`: the TorchScript export quantized by onnxruntime's quantizer: `quantize_static`
  (int8 weights per channel, uint8 activations, 4 random calibration draws) in QDQ and QOperator form, and
  `quantize_dynamic` (int8 weights: ConvInteger / MatMulInteger).

onnxconverter-common and onnxsim are not dependencies (`pip install onnxconverter-common onnxsim==0.8.1`).
Prints one markdown row per file, like tools/sweep_wheels.py (whose `prune` runs each command): exit code, the
one-line error where it is not 0 (a traceback is reported as a bug), the groups pruned, the MACs before / after,
the warnings, the seconds of the whole process.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.sweep_wheels import prune  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "googlenet", "densenet121", "unet", "vit_tiny", "bert_layer")
VARIANTS = ("opset7", "opset9", "opset11", "fp16", "fp16-io32", "simplified", "ort-basic", "ort-extended",
            "ort-transformers", "qdq", "qoperator", "dynamic")
TRANSFORMER_TYPES = {"bert_layer": "bert", "vit_tiny": "vit"}   # onnxruntime's optimizer's model types


def make(name: str, variant: str, path: Path) -> None:
    """Write model `name` as `variant` to `path` (raises where the variant cannot be made)."""
    import onnx

    from spa import models

    if variant.startswith("opset"):
        import torch

        opset = int(variant[5:])
        net = models.build(name, small=True).eval()
        torch.onnx.export(net, models.example_inputs(name, small=True), str(path), dynamo=False,
                          opset_version=opset, input_names=models.input_names(name), do_constant_folding=opset >= 9)
        return
    source = models.zoo_path(name, dynamo=variant == "simplified", small=True)
    if variant.startswith("fp16"):
        from onnxconverter_common import float16

        onnx.save(float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=variant == "fp16-io32"),
                  str(path))
    elif variant == "simplified":
        import onnxsim

        onnx.save(onnxsim.simplify(onnx.load(str(source)))[0], str(path))
    elif variant == "ort-transformers":
        if name not in TRANSFORMER_TYPES:
            raise ValueError("onnxruntime's transformer optimizer is for transformers")
        from onnxruntime.transformers import optimizer

        optimizer.optimize_model(str(models.zoo_path(name, small=True)), model_type=TRANSFORMER_TYPES[name],
                                 num_heads=0, hidden_size=0, opt_level=0).save_model_to_file(str(path))
    elif variant in ("qdq", "qoperator", "dynamic"):
        quantized(name, source, variant, path)
    elif variant.startswith("ort-"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if variant == "ort-basic"
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        opts.optimized_model_filepath = str(path)
        ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
    else:
        raise ValueError(f"unknown variant {variant!r}")


def quantized(name: str, source: Path, variant: str, path: Path) -> None:
    """`source` as onnxruntime's quantizer writes it (a private copy: the quantizer writes beside its input)."""
    import logging
    import shutil

    import numpy as np
    from onnxruntime import quantization as qz

    from spa import models

    logging.getLogger().setLevel(logging.ERROR)
    copy = path.with_name(f"{path.stem}-float.onnx")
    shutil.copy(source, copy)
    if variant == "dynamic":
        qz.quantize_dynamic(str(copy), str(path), weight_type=qz.QuantType.QInt8)
        return
    examples = models.example_inputs(name, small=True)
    examples = examples if isinstance(examples, tuple) else (examples,)
    names = models.input_names(name)
    draws = [{n: (np.random.default_rng(i).standard_normal(tuple(x.shape)).astype(np.float32)
                  if x.is_floating_point() else x.numpy()) for n, x in zip(names, examples)} for i in range(4)]

    class Reader(qz.CalibrationDataReader):
        def __init__(self):
            self.it = iter(draws)

        def get_next(self):
            return next(self.it, None)

    qz.quantize_static(str(copy), str(path), Reader(), per_channel=True, weight_type=qz.QuantType.QInt8,
                       activation_type=qz.QuantType.QUInt8,
                       quant_format=qz.QuantFormat.QDQ if variant == "qdq" else qz.QuantFormat.QOperator)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cli-args", default="--target-flops 0.5", help="what follows IN OUT")
    args = ap.parse_args(argv)
    print("| model | variant | exit | status | groups pruned | MACs before | MACs after | removed | warnings | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            for variant in args.variants.split(","):
                path = folder / f"{name}-{variant}.onnx"
                try:
                    with warnings.catch_warnings():   # the float16 converter's notes on truncated constants
                        warnings.simplefilter("ignore")
                        make(name, variant, path)
                except Exception as e:  # noqa: BLE001 - the exporter or converter, not us: a row saying so
                    print(f"| {name} | {variant} | | not made: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120] if str(e) else ''} | | | | | | |", flush=True)
                    continue
                r = prune(path, {}, folder, args.cli_args)
                removed = f"{100 * (1 - r['after'] / r['before']):.1f} %" if r.get("before") else ""
                status = r["status"].replace("|", "\\|")
                print(f"| {name} | {variant} | {r['exit']} | {status} | {r.get('groups', '')} | {r.get('before', '')} "
                      f"| {r.get('after', '')} | {removed} | {r.get('warnings', '')} | {r['seconds']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
