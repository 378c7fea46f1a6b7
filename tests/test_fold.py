"""spa.passes.fold: every constant folder against onnxruntime running the same single node on the same inputs.

Each case is one node (op, attributes, constant inputs); onnxruntime runs it as a one-node model with the inputs
fed at run time (no initializers, graph optimizations off, so ORT's own constant folding cannot take part) and
the folder must agree in shape, dtype and value. A test checks that every op in FOLDERS has at least one case.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from spa.passes.fold import FOLDERS, MAX_FOLD_ELEMENTS, constant_node_value, evaluate

OPSET = 17
IR_VERSION = 10
RNG = np.random.default_rng(0)


def f32(*shape, lo=-3.0, hi=3.0):
    return RNG.uniform(lo, hi, shape).astype(np.float32)


def i64(*v):
    return np.array(v, dtype=np.int64)


def ints(*shape, lo=-9, hi=10, dtype=np.int64):
    return RNG.integers(lo, hi, shape).astype(dtype)


# (id, op, attributes, inputs); None in inputs is an omitted optional input
CASES = [
    ("identity", "Identity", {}, [f32(2, 3)]),
    ("identity-int", "Identity", {}, [ints(4)]),
    ("cast-f2i", "Cast", {"to": onnx.TensorProto.INT64}, [f32(3, 4, lo=-5, hi=5)]),
    ("cast-i2f", "Cast", {"to": onnx.TensorProto.FLOAT}, [ints(5)]),
    ("cast-i2i32", "Cast", {"to": onnx.TensorProto.INT32}, [ints(5)]),
    ("cast-f2bool", "Cast", {"to": onnx.TensorProto.BOOL}, [np.array([0.0, 1.5, -2.0, 0.0], np.float32)]),
    ("cast-f2f16", "Cast", {"to": onnx.TensorProto.FLOAT16}, [f32(6)]),
    ("gather-axis0", "Gather", {}, [f32(4, 3), i64(3, 0, 0)]),
    ("gather-axis1-neg", "Gather", {"axis": 1}, [f32(2, 5), i64(-1, 2)]),
    ("gather-scalar-index", "Gather", {"axis": 0}, [i64(1, 8, 8, 3), np.array(2, np.int64)]),
    ("gather-int32-index", "Gather", {"axis": -1}, [f32(2, 3), np.array([[2, 0]], np.int32)]),
    ("concat-shapes", "Concat", {"axis": 0}, [i64(1, 3), i64(-1), i64(7, 7)]),
    ("concat-neg-axis", "Concat", {"axis": -1}, [f32(2, 3), f32(2, 1)]),
    ("unsqueeze", "Unsqueeze", {}, [f32(3, 4), i64(0, -1)]),
    ("unsqueeze-scalar", "Unsqueeze", {}, [np.array(5, np.int64), i64(0)]),
    ("unsqueeze-middle", "Unsqueeze", {}, [f32(2, 3), i64(1, 3)]),
    ("squeeze-axes", "Squeeze", {}, [f32(1, 3, 1, 2), i64(-2)]),
    ("squeeze-all", "Squeeze", {}, [f32(1, 3, 1, 2)]),
    ("reshape", "Reshape", {}, [f32(2, 3, 4), i64(0, -1)]),
    ("reshape-flat", "Reshape", {}, [f32(2, 3, 4), i64(-1)]),
    ("reshape-allowzero", "Reshape", {"allowzero": 1}, [f32(0, 3), i64(3, 0)]),
    ("transpose-perm", "Transpose", {"perm": [2, 0, 1]}, [f32(2, 3, 4)]),
    ("transpose-default", "Transpose", {}, [f32(2, 3, 4)]),
    ("slice", "Slice", {}, [f32(5, 6), i64(1, 0), i64(4, 6), i64(0, 1), i64(1, 2)]),
    ("slice-default-axes", "Slice", {}, [f32(5, 6), i64(1), i64(-1)]),
    ("slice-negative-step", "Slice", {}, [f32(6), i64(-1), i64(-(2**63) + 1), i64(0), i64(-2)]),
    ("slice-clamped-end", "Slice", {}, [i64(1, 3, 224, 224), i64(2), i64(2**63 - 1), i64(0), i64(1)]),
    ("constofshape-default", "ConstantOfShape", {}, [i64(2, 3)]),
    ("constofshape-int", "ConstantOfShape", {"value": numpy_helper.from_array(i64(7))}, [i64(3)]),
    ("constofshape-float", "ConstantOfShape", {"value": numpy_helper.from_array(np.array([0.5], np.float32))},
     [i64(1, 2, 2)]),
    ("constofshape-scalar", "ConstantOfShape", {"value": numpy_helper.from_array(i64(1))},
     [np.zeros(0, np.int64)]),
    ("range-int", "Range", {}, [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)]),
    ("range-neg", "Range", {}, [np.array(5, np.int64), np.array(-2, np.int64), np.array(-2, np.int64)]),
    ("range-float", "Range", {}, [np.array(0.5, np.float32), np.array(3.0, np.float32),
                                  np.array(0.7, np.float32)]),
    ("range-empty", "Range", {}, [np.array(3, np.int64), np.array(1, np.int64), np.array(1, np.int64)]),
    ("expand", "Expand", {}, [f32(3, 1), i64(2, 3, 4)]),
    ("expand-smaller-shape", "Expand", {}, [f32(3, 1), i64(1, 1)]),
    ("expand-int", "Expand", {}, [i64(1, 2, 3), i64(2, 1)]),
    ("add", "Add", {}, [f32(2, 3), f32(3)]),
    ("add-int", "Add", {}, [ints(4), ints(1)]),
    ("sub", "Sub", {}, [f32(2, 3), f32(2, 1)]),
    ("sub-int32", "Sub", {}, [ints(5, dtype=np.int32), ints(5, dtype=np.int32)]),
    ("mul", "Mul", {}, [f32(4), f32(4)]),
    ("mul-int", "Mul", {}, [ints(2, 2), ints(2, 2)]),
    ("div", "Div", {}, [f32(3, 4), f32(4, lo=0.5, hi=2)]),
    ("div-int-trunc", "Div", {}, [i64(7, -7, 7, -7, 224, 0), i64(2, 2, -2, -2, 32, 5)]),
    ("div-int-broadcast", "Div", {}, [ints(3, 4, lo=-100, hi=100), i64(3)]),
    ("neg", "Neg", {}, [f32(5)]),
    ("neg-int", "Neg", {}, [ints(5)]),
    ("sqrt", "Sqrt", {}, [f32(6, lo=0, hi=9)]),
    ("reciprocal", "Reciprocal", {}, [f32(6, lo=0.5, hi=4)]),
    ("floor", "Floor", {}, [f32(8)]),
    ("ceil", "Ceil", {}, [f32(8)]),
    ("equal", "Equal", {}, [i64(1, 2, 3, 4), i64(1, 0, 3, 0)]),
    ("equal-broadcast", "Equal", {}, [ints(3, 2, lo=0, hi=3), ints(2, lo=0, hi=3)]),
    ("where", "Where", {}, [np.array([True, False, True]), f32(3), f32(3)]),
    ("where-broadcast", "Where", {}, [np.array([[True], [False]]), i64(1, 2, 3), i64(-1)]),
    ("max", "Max", {}, [f32(4), f32(4), f32(4)]),
    ("max-int", "Max", {}, [ints(3), ints(3)]),
    ("max-one", "Max", {}, [f32(2, 2)]),
    ("min", "Min", {}, [f32(4), f32(4)]),
    ("min-int", "Min", {}, [ints(3), ints(3), ints(3)]),
]

# Known mismatches, kept visible: integer Div goes through float64 (np.trunc(a / b)), inexact above 2**53.
# Shape arithmetic never gets there; INT64_MAX-style sentinels (Slice ends) would.
KNOWN_BAD = [
    ("div-int64-above-2**53", "Div", {}, [i64(2**62 + 1, 2**53 + 1, -(2**63) + 1), i64(1, 1, 3)]),
]

# Ops the folders compute for same-shaped inputs only: with broadcasting inputs np.maximum.reduce(list) sees
# a ragged list and raises, so evaluate() declines (returns None) and the node stays in the graph - not wrong,
# just not folded. ORT broadcasts; checked here as a documented limitation, not as a mismatch.
DECLINED = [
    ("max-broadcast", "Max", {}, [f32(2, 3), f32(3)]),
    ("min-broadcast", "Min", {}, [ints(2, 1), ints(3)]),
]


def make_node(op, attrs, inputs):
    names = [f"x{i}" if v is not None else "" for i, v in enumerate(inputs)]
    return helper.make_node(op, names, ["y"], **attrs)


def run_ort(node, inputs):
    feeds = {n: v for n, v in zip(node.input, inputs) if v is not None}
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                    for n, v in feeds.items()]
    graph = helper.make_graph([node], "one", graph_inputs, [onnx.ValueInfoProto(name="y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    (vi,) = [v for v in inferred.graph.value_info if v.name == "y"] or inferred.graph.output
    model.graph.output[0].CopyFrom(vi)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("op,attrs,inputs", [pytest.param(*c[1:], id=c[0]) for c in CASES] + [
    pytest.param(*c[1:], id=c[0], marks=pytest.mark.xfail(strict=False, reason="integer Div via float64"))
    for c in KNOWN_BAD])
def test_folder_matches_onnxruntime(op, attrs, inputs):
    node = make_node(op, attrs, inputs)
    want = run_ort(node, inputs)
    got = FOLDERS[op](node, [None if v is None else v.copy() for v in inputs])
    got = np.asarray(got)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    if np.issubdtype(want.dtype, np.floating):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)
    # evaluate() is the entry normalization uses: same value, one output
    (ev,) = evaluate(node, list(inputs))
    np.testing.assert_array_equal(ev, got)


def test_every_folder_has_a_case():
    covered = {c[1] for c in CASES}
    assert covered == set(FOLDERS), f"no case for {sorted(set(FOLDERS) - covered)}; unknown {covered - set(FOLDERS)}"


@pytest.mark.parametrize("op,attrs,inputs", [c[1:] for c in DECLINED], ids=[c[0] for c in DECLINED])
def test_broadcasting_max_min_is_declined_not_wrong(op, attrs, inputs):
    node = make_node(op, attrs, inputs)
    run_ort(node, inputs)  # valid ONNX that ORT runs
    assert evaluate(node, list(inputs)) is None


def test_evaluate_declines_unknown_domain_and_huge_outputs():
    node = helper.make_node("Add", ["a", "b"], ["y"], domain="com.example")
    assert evaluate(node, [f32(2), f32(2)]) is None
    assert evaluate(helper.make_node("NonZero", ["a"], ["y"]), [f32(3)]) is None
    big = helper.make_node("ConstantOfShape", ["s"], ["y"])
    assert evaluate(big, [i64(MAX_FOLD_ELEMENTS + 1)]) is None
    assert evaluate(helper.make_node("Reshape", ["a", "s"], ["y"]), [f32(6), i64(4)]) is None  # error: declined


@pytest.mark.parametrize("attrs,want", [
    ({"value": numpy_helper.from_array(f32(2, 2))}, None),
    ({"value_float": 1.5}, np.array(1.5, np.float32)),
    ({"value_int": 3}, np.array(3, np.int64)),
    ({"value_floats": [1.0, 2.0]}, np.array([1.0, 2.0], np.float32)),
    ({"value_ints": [4, 5]}, np.array([4, 5], np.int64)),
])
def test_constant_node_value_matches_onnxruntime(attrs, want):
    node = helper.make_node("Constant", [], ["y"], **attrs)
    ref = run_ort(node, [])
    got = constant_node_value(node)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    if want is not None:
        np.testing.assert_array_equal(got, want)
