"""Front-ends: models exported by other frameworks' own converters (tests/fixtures, made by make_*.py there),
pruned by spa-prune and checked against the framework's own outputs. Needs none of those frameworks.

  sklearn_mlp  scikit-learn MLPClassifier (64-32 hidden) on digits, skl2onnx, zipmap off
  keras_cnn    Keras 3 CNN on digits (BN folded, depthwise residual block, NHWC flatten), tf2onnx from_keras
  jax_cnn      Flax NNX CNN on digits, jax2onnx (wrong value_info kept in the file)
  paddle_cnn   PaddlePaddle CNN, paddle2onnx without its optimizer (Constant-node weights, Identity nodes, BN kept)

For each: the original file in onnxruntime reproduces the framework's outputs (within 1e-4 of the output's scale;
class labels exactly); pruning at ratio 0.5 and at target_flops 0.5 passes verification, the written file passes
onnx.checker's full check and runs; MACs (counted here again from the shapes onnxruntime produces) and parameters
drop to the exact numbers of the documented rounding rule; ratio 0 gives back the framework's outputs. On the two
labelled models trained on digits (scikit-learn and Keras), test-split accuracy is measured before and after pruning
with l2 importance, with OBS scores only, and with OBSPA reconstruction on calibration data from the training split
(tests/fixtures/*_calib.npz); run with -s to see the table.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from spa import driver

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from frontend_data import HERE as FIXTURES
from frontend_data import load_reference

TOL = 1e-4  # |onnxruntime - framework| <= TOL * max|framework output|

# name: (MACs, params, units per group, units kept at ratio 0.5, frozen groups' reasons)
EXPECTED = {
    "sklearn_mlp": ((6464, 2720), (6570, 2778), [64, 32, 10], [32, 16, 10], ["Softmax"]),
    "keras_cnn": ((141952, 40256), (38714, 9954), [16, 32, 64, 10], [8, 16, 32, 10], ["graph output 'logits'"]),
    "jax_cnn": ((337536, 86848), (38346, 9834), [16, 32, 64, 10], [8, 16, 32, 10], ["graph output 'logits'"]),
    "paddle_cnn": ((484992, 123712), (40714, 10442), [16, 32, 64, 10], [8, 16, 32, 10],
                   ["graph output 'fetch_name_0'"]),
}
NAMES = list(EXPECTED)
LABELLED = ["sklearn_mlp", "keras_cnn"]


def session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run(model, feeds: dict) -> dict:
    s = session(model)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def assert_matches(got: dict, want: dict, what: str) -> None:
    for name, ref in want.items():
        out = got[name]
        assert out.shape == ref.shape, (what, name, out.shape, ref.shape)
        if ref.dtype.kind in "iu":
            np.testing.assert_array_equal(out, ref, err_msg=f"{what}: {name}")
        else:
            err = float(np.abs(out.astype(np.float64) - ref).max())
            assert err <= TOL * float(np.abs(ref).max()), f"{what}: {name} max|diff| {err:.3g}"


def logits_name(outputs: dict) -> str:
    return next(k for k, v in outputs.items() if v.dtype.kind == "f")


def accuracy(model, name: str) -> float:
    inputs, outputs, labels = load_reference(name)
    return float((run(model, inputs)[logits_name(outputs)].argmax(1) == labels).mean())


def runtime_macs(model: onnx.ModelProto) -> int:
    """MACs of Conv/ConvTranspose/Gemm/MatMul (DESIGN.md's definition) at batch 1, from the shapes onnxruntime
    actually produces: every tensor those nodes read or write is made a graph output. Independent of onnx shape
    inference (which loses the dims behind run-time shape arithmetic) and of spa's cost model."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    inputs = {i.name: i for i in m.graph.input}
    nodes = [n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    wanted = {x for n in nodes for x in (*n.input[:2], n.output[0])} - set(inits) - set(inputs)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=x) for x in sorted(wanted - have))
    feeds = {}
    for name, vi in inputs.items():
        if name not in inits:
            dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
            feeds[name] = np.zeros(dims, onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    shapes = {k: v.shape for k, v in run(m, feeds).items()}
    shapes.update(inits)
    shapes.update({k: v.shape for k, v in feeds.items()})
    total = 0
    for n in nodes:
        a, w, y = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "Conv":
            total += int(np.prod(y)) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            total += int(np.prod(a)) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
            total += int(np.prod(y)) * (a[0] if trans_a else a[1])
        else:
            total += int(np.prod(y)) * a[-1]
    return total


@functools.cache
def pruned(name: str, folder: str, **kw):
    """driver.prune of a fixture into folder (cached per options): (report, written ModelProto)."""
    out = Path(folder) / f"{name}-{'-'.join(f'{k}{v}' for k, v in sorted(kw.items()))}.onnx"
    calib = kw.pop("calib", None)
    res = driver.prune(str(FIXTURES / f"{name}.onnx"), str(out), calib=calib and str(FIXTURES / calib), **kw)
    return res.report, onnx.load(str(out))


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("frontends"))


@pytest.mark.parametrize("name", NAMES)
def test_original_matches_framework(name):
    inputs, outputs, _ = load_reference(name)
    assert_matches(run(FIXTURES / f"{name}.onnx", inputs), outputs, f"{name} original")


@pytest.mark.parametrize("name", NAMES)
def test_prune_ratio(name, outdir):
    (macs, macs_half), (params, params_half), units, kept, frozen_why = EXPECTED[name]
    original = onnx.load(str(FIXTURES / f"{name}.onnx"))
    rep, model = pruned(name, outdir, ratio=0.5)
    assert rep["verification"]["status"] == "passed" and rep["verification"]["inputs"] == 2
    onnx.checker.check_model(model, full_check=True)
    assert (rep["macs"]["before"], rep["macs"]["after"]) == (macs, macs_half)
    assert (runtime_macs(original), runtime_macs(model)) == (macs, macs_half)
    assert (rep["params"]["before"], rep["params"]["after"]) == (params, params_half)
    assert [g["units"] for g in rep["per_group"]] == units
    assert [g["kept"] for g in rep["per_group"]] == kept
    assert rep["groups"]["frozen"] == len(frozen_why) and rep["groups"]["pruned"] == len(units) - len(frozen_why)
    reasons = [r["where"] + ": " + r["why"] for f in rep["frozen"] for r in f["reasons"]]
    assert all(any(w in r for r in reasons) for w in frozen_why), reasons
    assert not rep["unruled_ops"]
    # the pruned file keeps the interface and serves the reference inputs (a batch of 540 or 16, not 1 or 2)
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    inputs, outputs, _ = load_reference(name)
    got = run(model, inputs)
    for k, v in outputs.items():
        assert got[k].shape == v.shape and np.isfinite(got[k]).all()


@pytest.mark.parametrize("name", NAMES)
def test_prune_target_flops(name, outdir):
    (macs, _), (params, _), _, _, frozen_why = EXPECTED[name]
    rep, model = pruned(name, outdir, target_flops=0.5)
    assert rep["verification"]["status"] == "passed"
    onnx.checker.check_model(model, full_check=True)
    assert rep["macs"]["before"] == macs
    assert 0.4 * macs <= rep["macs"]["after"] <= 0.5 * macs
    assert runtime_macs(model) == rep["macs"]["after"]
    assert rep["params"]["after"] < params
    assert rep["groups"]["pruned"] >= 1 and rep["groups"]["frozen"] == len(frozen_why)


@pytest.mark.parametrize("name", NAMES)
def test_ratio_zero_equals_framework(name, outdir):
    rep, model = pruned(name, outdir, ratio=0.0)
    assert rep["macs"]["after"] == rep["macs"]["before"] and rep["params"]["after"] == rep["params"]["before"]
    inputs, outputs, _ = load_reference(name)
    assert_matches(run(model, inputs), outputs, f"{name} pruned with ratio 0")


def test_dialects_are_normalized():
    """What normalization did to each dialect (the reason each group above is prunable)."""
    reports = {name: driver.load(str(FIXTURES / f"{name}.onnx")).normalize_report for name in NAMES}
    # every dynamic-batch flatten reads only the batch once its Shape is split (tf2onnx, jax2onnx, paddle2onnx)
    assert [reports[n]["shape_reads_split"] for n in NAMES] == [0, 1, 1, 1]
    # paddle2onnx: every weight a Constant node, Identity after each Add and on the output (kept: a graph output)
    assert reports["paddle_cnn"]["lifted_constants"] == 24 and reports["paddle_cnn"]["identities_removed"] == 6
    # jax2onnx's value_info in the file is wrong (NHWC shape on an NCHW tensor); the pruner does not read it
    vi = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
          for v in onnx.load(str(FIXTURES / "jax_cnn.onnx")).graph.value_info}
    assert vi["relu_out_0"] == ["B", 8, 8, 16]


# ---- accuracy on the digits test split (540 samples) ---------------------------------------------------------------
# name: (original accuracy, bounds after pruning: l2 at 0.5, OBSPA at 0.3 and 0.5 (at most this many points lost))
ACCURACY = {"sklearn_mlp": (0.9778, 0.40, 0.02, 0.02), "keras_cnn": (0.9889, 0.60, 0.02, 0.02)}


@pytest.mark.parametrize("name", LABELLED)
def test_accuracy_before_and_after(name, outdir):
    pytest.importorskip("torch")  # OBSPA runs the model through the torch lowering
    base, l2_floor, drop_03, drop_05 = ACCURACY[name]
    before = accuracy(FIXTURES / f"{name}.onnx", name)
    assert before == pytest.approx(base, abs=1e-3)
    calib = f"{name}_calib.npz"
    rows = {}
    for ratio in (0.3, 0.5):
        for label, kw in (("l2", {}), ("obs, no refit", {"importance": "obspa", "reconstruct": False, "calib": calib}),
                          ("obspa", {"importance": "obspa", "calib": calib})):
            rep, model = pruned(name, outdir, ratio=ratio, **kw)
            assert rep["verification"]["status"] == "passed"
            onnx.checker.check_model(model, full_check=True)
            rows[ratio, label] = (accuracy(model, name), rep["macs"]["after"] / rep["macs"]["before"])
    print(f"\n{name}: test accuracy {before:.4f} before pruning")
    for (ratio, label), (acc, macs) in rows.items():
        print(f"  ratio {ratio}  {label:<14} accuracy {acc:.4f}  MACs x{macs:.3f}")
    assert rows[0.5, "l2"][0] >= l2_floor
    assert rows[0.3, "obspa"][0] >= before - drop_03
    assert rows[0.5, "obspa"][0] >= before - drop_05
    assert rows[0.5, "obspa"][0] > rows[0.5, "l2"][0]  # the refit on calibration data is what keeps the accuracy
    for ratio in (0.3, 0.5):
        assert rows[ratio, "obspa"][0] >= rows[ratio, "obs, no refit"][0]


def test_sklearn_label_follows_probabilities(outdir):
    """skl2onnx's label output (ArgMax -> ai.onnx.ml ArrayFeatureExtractor over the classes) stays consistent with
    the pruned probabilities, also after OBSPA, whose torch lowering runs that operator."""
    pytest.importorskip("torch")
    inputs, _, _ = load_reference("sklearn_mlp")
    _, model = pruned("sklearn_mlp", outdir, ratio=0.5, importance="obspa", calib="sklearn_mlp_calib.npz")
    got = run(model, inputs)
    np.testing.assert_array_equal(got["label"], got["probabilities"].argmax(1))
