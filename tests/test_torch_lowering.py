"""TorchGraph (spa/torch_graph.py) and the torch lowerings (spa/lowering/) against onnxruntime.

1. every zoo model (small variants, both exporters), raw file and normalized graph: outputs equal onnxruntime's
   within 1e-4 of the output scale;
2. gradients reach every Conv/Gemm/MatMul weight (resnet18, vit_tiny) and pass Q -> DQ (straight-through);
3. single-operator models for the tricky corners (Resize modes, Pad modes, ConvTranspose, pooling ceil_mode,
   Split forms, Softmax opset 11 vs 13, QDQ per axis, TopK, Gemm flags, ...) compared with onnxruntime;
4. the errors: an op with no lowering, a subgraph op.
Plus the module API: run with hook/keep/freeing, step, param names, state_dict_onnx, half upcast.
"""
from __future__ import annotations

import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")
from helpers import make_model

from spa import driver, models
from spa.errors import SpaError
from spa.lowering import LOWERINGS, lower, lowering
from spa.torch_graph import TorchGraph

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]
INT_MAX = 2 ** 63 - 1


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(ref: np.ndarray, got, what="", tol=1e-4):
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    assert ref.shape == got.shape, f"{what}: shape {got.shape} != onnxruntime {ref.shape}"
    assert ref.dtype == got.dtype, f"{what}: dtype {got.dtype} != onnxruntime {ref.dtype}"
    if ref.dtype.kind == "f":
        diff = float(np.abs(ref.astype(np.float64) - got).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        assert diff <= tol * scale + 1e-6, f"{what}: max|diff| {diff:.3g} vs scale {scale:.3g}"
    else:
        np.testing.assert_array_equal(got, ref, err_msg=what)


# ---- 1. the zoo --------------------------------------------------------------------------------------------------
def zoo_feeds(model: onnx.ModelProto, name: str) -> dict:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return {n: x.numpy() for n, x in zip(names, models.example_inputs(name, small=True))}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_zoo_matches_onnxruntime(name, dynamo):
    path = models.zoo_path(name, dynamo=dynamo, small=True)
    model = onnx.load(str(path))
    feeds = zoo_feeds(model, name)
    ref = ort_run(model, feeds)
    normalized = driver.load(str(path))
    for what, tg in (("raw", TorchGraph(model)), ("normalized", TorchGraph(normalized.graph))):
        with torch.no_grad():
            out = tg(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == len(ref)
        for r, o in zip(ref, out):
            assert_close(r, o, f"{name} {what}")


# ---- 2. gradients ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_gradients_reach_every_weight(name):
    model = onnx.load(str(models.zoo_path(name, small=True)))
    tg = TorchGraph(model)
    (x,) = models.example_inputs(name, small=True)
    y = tg(x)
    (y * y).mean().backward()
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
               and n.input[1] in tg.param_names}
    assert len(weights) >= 5
    for w in weights:
        g = tg.param(w).grad
        assert g is not None, w
        assert torch.isfinite(g).all(), w
        assert g.abs().sum() > 0, w


def test_gradient_through_qdq_is_straight_through():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [onnx.numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(128, np.uint8), "z")]
    model = make_model(nodes, inits, [("x", [2, 8])], ["y"])
    tg = TorchGraph(model)
    x = torch.linspace(-3, 3, 16).reshape(2, 8).requires_grad_()
    y = tg(x)
    y.sum().backward()
    np.testing.assert_allclose(y.detach().numpy(), ort_run(model, {"x": x.detach().numpy()})[0], atol=1e-6)
    assert torch.equal(x.grad, torch.ones_like(x))  # inside the int8 range, identity gradient
    with torch.no_grad():
        q = TorchGraph(make_model(nodes[:1], inits, [("x", [2, 8])], [("q", TensorProto.UINT8)]))(x)
    assert q.dtype == torch.uint8  # without grad the real integer type


# ---- 3. single operators -----------------------------------------------------------------------------------------
def rng(seed=0):
    return np.random.default_rng(seed)


def randn(*shape, seed=0):
    return rng(seed).standard_normal(shape).astype(np.float32)


def op_model(op, inputs, attrs=None, *, consts=(), n_out=1, opset=17, domain=""):
    """One `op` node; inputs are numpy arrays (None: a missing optional input). Those whose index is in `consts`
    become initializers, the rest graph inputs. Returns (model, feeds)."""
    names, inits, vis, feeds = [], [], [], {}
    for i, v in enumerate(inputs):
        if v is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if i in consts:
            inits.append(onnx.numpy_helper.from_array(np.asarray(v), name))
        else:
            v = np.asarray(v)
            vis.append((name, list(v.shape), helper.np_dtype_to_tensor_dtype(v.dtype)))
            feeds[name] = v
    while names and not names[-1]:
        names.pop()
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, name=f"{op.lower()}_node", domain=domain or None, **(attrs or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, s) for n, s, t in vis],
                              [onnx.ValueInfoProto(name=o) for o in outs], initializer=inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    if not domain:  # output types from onnx inference (onnxruntime needs them)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        types = {v.name: v.type for v in inferred.graph.output}
        for o in model.graph.output:
            o.type.CopyFrom(types[o.name])
    return model, feeds


def check(op, inputs, attrs=None, *, consts=(), n_out=1, opset=17, tol=1e-4):
    model, feeds = op_model(op, inputs, attrs, consts=consts, n_out=n_out, opset=opset)
    ref = ort_run(model, feeds)
    tg = TorchGraph(model)
    with torch.no_grad():
        got = tg.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
    for i, r in enumerate(ref):
        assert_close(r, got[f"out{i}"], f"{op} output {i}", tol)


def i64(*v):
    return np.array(v, dtype=np.int64)


def f32(*v):
    return np.array(v, dtype=np.float32)


X4 = randn(2, 3, 7, 9)

RESIZE = []
# (tf_half_pixel_for_nearest is implemented from the spec but onnxruntime 1.31 rejects it, so it is not compared)
for _ctm in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"):
    for _nm in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        for _sc in ((1, 1, 2, 3), (1, 1, 0.5, 0.6), (1, 1, 1.7, 0.8)):
            RESIZE.append(pytest.param({"mode": "nearest", "coordinate_transformation_mode": _ctm, "nearest_mode": _nm},
                                       _sc, None, 13, id=f"nearest-{_ctm}-{_nm}-{_sc}"))
for _ctm in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "half_pixel_symmetric"):
    for _sc in ((1, 1, 2, 3), (1, 1, 0.5, 0.6), (1, 1, 1.3, 0.7)):
        RESIZE.append(pytest.param({"mode": "linear", "coordinate_transformation_mode": _ctm}, _sc, None,
                                   19 if _ctm == "half_pixel_symmetric" else 13, id=f"linear-{_ctm}-{_sc}"))
for _ctm in ("half_pixel", "align_corners", "asymmetric"):
    for _ex in (0, 1):
        RESIZE.append(pytest.param({"mode": "cubic", "coordinate_transformation_mode": _ctm, "exclude_outside": _ex},
                                   (1, 1, 1.5, 0.7), None, 13, id=f"cubic-{_ctm}-excl{_ex}"))
RESIZE += [
    pytest.param({"mode": "cubic", "cubic_coeff_a": -0.5}, (1, 1, 2.0, 2.0), None, 13, id="cubic-a-0.5"),
    pytest.param({"mode": "linear"}, None, (2, 3, 4, 20), 13, id="linear-sizes"),
    pytest.param({"mode": "nearest"}, None, (2, 3, 15, 4), 13, id="nearest-sizes"),
    pytest.param({"mode": "linear", "keep_aspect_ratio_policy": "not_larger", "axes": [2, 3]}, None, (10, 10), 18,
                 id="linear-not_larger-axes"),
    pytest.param({"mode": "nearest", "keep_aspect_ratio_policy": "not_smaller", "axes": [2, 3]}, None, (10, 10), 18,
                 id="nearest-not_smaller-axes"),
    pytest.param({"mode": "linear", "axes": [3]}, (2.5,), None, 18, id="linear-axes-scales"),
]


@pytest.mark.parametrize("attrs,scales,sizes,opset", RESIZE)
def test_resize(attrs, scales, sizes, opset):
    sc = None if scales is None else np.array(scales, np.float32)
    sz = None if sizes is None else np.array(sizes, np.int64)
    check("Resize", [X4, None, sc, sz], attrs, consts={2, 3}, opset=opset)


def test_resize_tf_crop_and_resize():
    roi = f32(0, 0, 0.2, 0.1, 1, 1, 0.9, 1.3)
    attrs = {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 7.0}
    check("Resize", [X4, roi, None, i64(2, 3, 5, 6)], attrs, consts={1, 3}, opset=13)
    attrs["mode"] = "nearest"
    check("Resize", [X4, roi, None, i64(2, 3, 5, 6)], attrs, consts={1, 3}, opset=13)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [(1, 1, 2, 3), (1, 1, 0.5, 0.5), (1, 1, 1.5, 2.5)])
def test_resize_legacy(mode, scales):
    check("Resize", [X4, np.array(scales, np.float32)], {"mode": mode}, consts={1}, opset=10)
    if min(scales) >= 1:  # Upsample only enlarges
        check("Upsample", [X4, np.array(scales, np.float32)], {"mode": mode}, consts={1}, opset=9)


PAD = [
    pytest.param("constant", i64(0, 1, 2, 3, 0, 2, 1, 0), f32(1.5), None, 13, id="constant-value"),
    pytest.param("constant", i64(0, 0, -1, 2, 0, 0, 1, -3), None, None, 13, id="constant-negative"),
    pytest.param("reflect", i64(0, 0, 3, 2, 0, 0, 1, 4), None, None, 13, id="reflect"),
    pytest.param("edge", i64(0, 1, 3, 2, 1, 0, 1, 4), None, None, 13, id="edge"),
    pytest.param("reflect", i64(1, 2, 2, 3), None, i64(1, -1), 18, id="reflect-axes"),
    pytest.param("wrap", i64(0, 0, 2, 3, 0, 0, 4, 1), None, None, 19, id="wrap"),
    pytest.param("edge", i64(0, 0, -2, 1, 0, 0, 3, -1), None, None, 13, id="edge-negative"),
]


@pytest.mark.parametrize("mode,pads,value,axes,opset", PAD)
def test_pad(mode, pads, value, axes, opset):
    check("Pad", [X4, pads, value, axes], {"mode": mode}, consts={1, 2, 3}, opset=opset)


def test_pad_opset2_attributes():
    check("Pad", [X4], {"mode": "constant", "pads": [0, 0, 1, 2, 0, 0, 2, 1], "value": -2.0}, opset=10)
    check("Pad", [X4], {"mode": "reflect", "pads": [0, 0, 1, 2, 0, 0, 2, 1]}, opset=10)


CONV_T = [
    pytest.param({"strides": [2, 2]}, (4, 3, 3, 3), 1, id="stride"),
    pytest.param({"strides": [2, 3], "output_padding": [1, 2]}, (4, 3, 3, 3), 1, id="output_padding"),
    pytest.param({"strides": [2, 2], "pads": [1, 0, 0, 2], "output_padding": [1, 1]}, (4, 3, 3, 3), 1,
                 id="asym-pads-output_padding"),
    pytest.param({"strides": [2, 2], "group": 2, "dilations": [2, 1], "pads": [1, 1, 1, 1]}, (4, 3, 3, 3), 2,
                 id="groups-dilations"),
    pytest.param({"strides": [3, 2], "output_shape": [13, 11]}, (4, 2, 3, 3), 1, id="output_shape"),
    pytest.param({"strides": [3, 2], "output_shape": [12, 10]}, (4, 2, 3, 3), 1, id="output_shape-odd"),
    pytest.param({"strides": [2, 2], "output_shape": [10, 11], "auto_pad": "SAME_UPPER"}, (4, 2, 3, 4), 1,
                 id="output_shape-same_upper"),
    pytest.param({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (4, 2, 4, 3), 1, id="same_upper"),
    pytest.param({"strides": [2, 3], "auto_pad": "SAME_LOWER"}, (4, 2, 3, 4), 1, id="same_lower"),
    pytest.param({"strides": [2, 2], "auto_pad": "SAME_LOWER"}, (4, 2, 3, 3), 1, id="same_lower-odd"),
    pytest.param({"strides": [1, 1], "auto_pad": "VALID"}, (4, 2, 3, 2), 1, id="valid"),
    pytest.param({"strides": [4, 4], "output_padding": [3, 0], "pads": [0, 0, 1, 0]}, (4, 2, 2, 2), 1,
                 id="output_padding-exceeds-pads"),
]


@pytest.mark.parametrize("attrs,wshape,group", CONV_T)
def test_conv_transpose(attrs, wshape, group):
    x = randn(1, 4, 5, 6)
    w = randn(*wshape, seed=1)
    b = randn(wshape[1] * group, seed=2)
    check("ConvTranspose", [x, w, b], attrs, consts={1, 2})


def test_conv_transpose_1d_3d():
    check("ConvTranspose", [randn(2, 3, 7), randn(3, 2, 3, seed=1)], {"strides": [2], "output_padding": [1]},
          consts={1})
    check("ConvTranspose", [randn(1, 2, 3, 4, 3), randn(2, 4, 2, 3, 2, seed=1), randn(8, seed=2)],
          {"strides": [2, 1, 2], "group": 2, "pads": [1, 0, 0, 0, 1, 1]}, consts={1, 2})


CONV = [
    pytest.param({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, id="same_upper"),
    pytest.param({"auto_pad": "SAME_LOWER", "strides": [2, 3]}, id="same_lower"),
    pytest.param({"auto_pad": "VALID", "strides": [2, 1]}, id="valid"),
    pytest.param({"pads": [0, 1, 2, 2], "strides": [1, 2], "dilations": [2, 1]}, id="asym-pads-dilations"),
    pytest.param({"pads": [1, 1, 1, 1], "group": 3}, id="groups"),
]


@pytest.mark.parametrize("attrs", CONV)
def test_conv(attrs):
    g = attrs.get("group", 1)
    check("Conv", [randn(2, 6, 9, 8), randn(6, 6 // g, 3, 3, seed=1), randn(6, seed=2)], attrs, consts={1, 2})


def test_conv_1d_3d():
    check("Conv", [randn(2, 4, 11), randn(6, 2, 3, seed=1)], {"group": 2, "pads": [2, 0], "dilations": [2]},
          consts={1})
    check("Conv", [randn(1, 2, 5, 6, 4), randn(3, 2, 3, 3, 2, seed=1), randn(3, seed=2)],
          {"auto_pad": "SAME_UPPER", "strides": [2, 2, 1]}, consts={1, 2})


POOL = [
    pytest.param("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, id="max-ceil"),
    pytest.param("MaxPool", {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1},
                 id="max-ceil-asym-pads"),
    pytest.param("MaxPool", {"kernel_shape": [2, 2], "strides": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1},
                 id="max-ceil-window-in-pad"),
    pytest.param("MaxPool", {"kernel_shape": [3, 3], "dilations": [2, 1], "pads": [2, 1, 2, 1]}, id="max-dilations"),
    pytest.param("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, id="max-same_upper"),
    pytest.param("MaxPool", {"kernel_shape": [4, 4], "strides": [3, 3], "auto_pad": "SAME_LOWER"}, id="max-same_lower"),
    pytest.param("MaxPool", {"kernel_shape": [3, 3], "pads": [0, 0, 2, 2]}, id="max-end-pads"),
    pytest.param("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, id="avg-pads"),
    pytest.param("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                     "count_include_pad": 1}, id="avg-pads-include"),
    pytest.param("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 2], "ceil_mode": 1},
                 id="avg-ceil-asym"),
    pytest.param("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 2], "ceil_mode": 1,
                                     "count_include_pad": 1}, id="avg-ceil-asym-include"),
    pytest.param("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1, "count_include_pad": 1},
                 id="avg-ceil-include"),
    pytest.param("AveragePool", {"kernel_shape": [3, 2], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
                 id="avg-same_upper"),
    pytest.param("AveragePool", {"kernel_shape": [3, 3], "dilations": [2, 2], "pads": [1, 1, 1, 1]},
                 id="avg-dilations"),
    pytest.param("LpPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "p": 2}, id="lp"),
    pytest.param("GlobalMaxPool", {}, id="global-max"),
    pytest.param("GlobalLpPool", {"p": 3}, id="global-lp"),
]


@pytest.mark.parametrize("op,attrs", POOL)
def test_pool(op, attrs):
    check(op, [X4], attrs, opset=19)


@pytest.mark.parametrize("storage_order", [0, 1])
@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1]])
def test_maxpool_indices(storage_order, pads):
    check("MaxPool", [X4], {"kernel_shape": [3, 2], "strides": [2, 2], "pads": pads, "storage_order": storage_order},
          n_out=2)


def test_pool_1d_3d():
    check("MaxPool", [randn(2, 3, 10)], {"kernel_shape": [3], "strides": [2], "ceil_mode": 1, "pads": [1, 1]})
    check("AveragePool", [randn(1, 2, 5, 6, 7)], {"kernel_shape": [2, 3, 2], "strides": [2, 2, 2], "ceil_mode": 1})


@pytest.mark.parametrize("split_kind", ["attr", "input", "equal", "num_outputs"])
def test_split(split_kind):
    x = randn(4, 11, 3)
    if split_kind == "attr":
        check("Split", [x], {"axis": 1, "split": [2, 4, 5]}, n_out=3, opset=11)
    elif split_kind == "input":
        check("Split", [x, i64(6, 5)], {"axis": -2}, consts={1}, n_out=2, opset=13)
    elif split_kind == "equal":
        check("Split", [x], {"axis": 0}, n_out=2, opset=13)
    else:
        check("Split", [x], {"axis": 1, "num_outputs": 3}, n_out=3, opset=18)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axis", [1, -1, 0])
def test_softmax_opsets(op, opset, axis):
    check(op, [X4], {"axis": axis}, opset=opset)


def test_softmax_opset11_default_axis_differs():
    m11, feeds = op_model("Softmax", [X4], opset=11)
    m13, _ = op_model("Softmax", [X4], opset=13)
    with torch.no_grad():
        a, b = TorchGraph(m11)(torch.from_numpy(X4)), TorchGraph(m13)(torch.from_numpy(X4))
    assert not torch.allclose(a, b)
    assert_close(ort_run(m11, feeds)[0], a)


@pytest.mark.parametrize("qtype", [np.uint8, np.int8])
def test_qdq_per_axis(qtype):
    x = randn(3, 4, 5) * 3
    scale = f32(0.02, 0.05, 0.1, 0.03)
    zp = np.array([0, 3, -2, 10] if qtype == np.int8 else [128, 100, 0, 255], qtype)
    check("QuantizeLinear", [x, scale, zp], {"axis": 1}, consts={1, 2}, opset=13)
    q = rng(1).integers(-128 if qtype == np.int8 else 0, 128, size=(3, 4, 5)).astype(qtype)
    check("DequantizeLinear", [q, scale, zp], {"axis": -2}, consts={1, 2}, opset=13)


def test_qdq_per_tensor():
    x = randn(2, 9) * 4
    check("QuantizeLinear", [x, np.array(0.03, np.float32), np.array(7, np.int8)], consts={1, 2}, opset=13)
    check("QuantizeLinear", [x, np.array(0.03, np.float32)], consts={1}, opset=13)  # uint8, zero point 0
    b = rng(2).integers(-10 ** 6, 10 ** 6, size=(6,)).astype(np.int32)
    check("DequantizeLinear", [b, np.full(6, 1e-3, np.float32), np.zeros(6, np.int32)], {"axis": 0},
          consts={1, 2}, opset=13)


@pytest.mark.parametrize("largest", [0, 1])
@pytest.mark.parametrize("axis", [-1, 1])
def test_topk(largest, axis):
    check("TopK", [X4, i64(3)], {"axis": axis, "largest": largest}, consts={1}, n_out=2)


GEMM = [
    pytest.param({}, (5, 4), (4, 3), (3,), id="plain-bias"),
    pytest.param({"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, (4, 5), (3, 4), (5, 1),
                 id="trans-alpha-beta-col"),
    pytest.param({"transB": 1}, (5, 4), (3, 4), (), id="scalar-c"),
    pytest.param({"transA": 1, "alpha": 3.0}, (4, 5), (4, 3), None, id="no-c"),
    pytest.param({"beta": 0.0}, (5, 4), (4, 3), (5, 3), id="beta0"),
    pytest.param({"beta": -1.0}, (5, 4), (4, 3), (1, 3), id="row-c"),
]


@pytest.mark.parametrize("attrs,a,b,c", GEMM)
def test_gemm(attrs, a, b, c):
    check("Gemm", [randn(*a), randn(*b, seed=1), None if c is None else randn(*c, seed=2)], attrs, consts={1, 2})


def test_matmul_broadcast():
    check("MatMul", [randn(2, 1, 4, 5), randn(3, 5, 6, seed=1)])
    check("MatMul", [randn(5), randn(2, 5, 3, seed=1)])
    check("MatMul", [randn(2, 3, 5), randn(5, seed=1)])


SLICE = [
    pytest.param(i64(1, -1), i64(INT_MAX, -INT_MAX), i64(2, 3), i64(2, -2), id="neg-step-int-max"),
    pytest.param(i64(-3), i64(-1), i64(-1), None, id="negative"),
    pytest.param(i64(0, 10), i64(5, -20), i64(0, 2), i64(2, -3), id="clamped"),
    pytest.param(i64(-INT_MAX), i64(INT_MAX), i64(3), i64(3), id="full-step3"),
]


@pytest.mark.parametrize("starts,ends,axes,steps", SLICE)
def test_slice(starts, ends, axes, steps):
    check("Slice", [X4, starts, ends, axes, steps], consts={1, 2, 3, 4})


def test_slice_opset9_attributes():
    check("Slice", [X4], {"starts": [1, -4], "ends": [100, -1], "axes": [1, 3]}, opset=9)


def test_gather_negative_indices():
    check("Gather", [X4, i64(-1, 0, -2)], {"axis": 1}, consts={1})
    check("Gather", [X4, np.array(-3, np.int64)], {"axis": -1}, consts={1})
    check("Gather", [randn(10, 4), np.array([[1, -1], [-10, 3]], np.int64)], consts={1})
    check("GatherElements", [X4, rng(3).integers(-7, 7, size=(2, 3, 4, 9))], {"axis": 2}, consts={1})


def test_gather_nd():
    """Index rows of 1-3 coordinates (negative ones too), with batch_dims 0-2, against onnxruntime."""
    x = randn(3, 4, 5, 6)
    check("GatherND", [x, np.array([[0, 1], [2, -1], [-3, 0]], np.int64)], consts={1})
    check("GatherND", [x, np.array([[[1]], [[-1]]], np.int64)], consts={1})
    check("GatherND", [x, rng(4).integers(0, 4, size=(3, 2, 3))], {"batch_dims": 1}, consts={1})
    check("GatherND", [x, rng(5).integers(-5, 5, size=(3, 4, 1))], {"batch_dims": 2}, consts={1})
    check("GatherND", [x, np.array([[1, 2, 3], [0, 0, 0]], np.int64)], consts={1})


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter(reduction):
    """ScatterND (rows of 1-2 coordinates, negative ones too) and ScatterElements, against onnxruntime."""
    x = randn(4, 5, 3)
    opset = 16 if reduction in ("none", "add", "mul") else 18
    check("ScatterND", [x, np.array([[1], [-1]], np.int64), randn(2, 5, 3)], {"reduction": reduction},
          consts={1}, opset=opset)
    check("ScatterND", [x, np.array([[0, 1], [3, -2], [2, 0]], np.int64), randn(3, 3)], {"reduction": reduction},
          consts={1}, opset=opset)
    idx = np.array([[[0, 1, 2]], [[4, -1, 3]]], np.int64)            # distinct targets per (row, channel)
    check("ScatterElements", [x, idx, randn(2, 1, 3)], {"axis": 1, "reduction": reduction}, consts={1},
          opset=opset)


REDUCE_OPS = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSumExp", "ReduceSumSquare"]


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce(op, keepdims):
    x = np.abs(X4) + 0.5 if op == "ReduceProd" else X4
    check(op, [x], {"axes": [1, -1], "keepdims": keepdims}, opset=11)  # axes attribute
    check(op, [x, i64(-2, 0)], {"keepdims": keepdims}, consts={1}, opset=18)  # axes input
    check(op, [x], {"keepdims": keepdims}, opset=18)  # all axes


@pytest.mark.parametrize("op", [*REDUCE_OPS, "ReduceLogSum"])
def test_reduce_noop_with_empty_axes(op):
    x = np.abs(X4) + 0.1 if op == "ReduceLogSum" else X4
    check(op, [x, np.zeros(0, np.int64)], {"noop_with_empty_axes": 1}, consts={1}, opset=18)


def test_reduce_log_sum():
    check("ReduceLogSum", [np.abs(X4) + 0.1, i64(2)], consts={1}, opset=18)
    check("ReduceSum", [X4, i64(1)], {"keepdims": 0}, consts={1}, opset=13)


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("last", [0, 1])
def test_argmax(op, last):
    x = rng(4).integers(0, 3, size=(3, 5, 4)).astype(np.float32)  # ties
    check(op, [x], {"axis": 1, "keepdims": 0, "select_last_index": last})
    check(op, [x], {"axis": -1, "select_last_index": last})


@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
def test_cumsum(exclusive, reverse):
    check("CumSum", [X4, i64(2)], {"exclusive": exclusive, "reverse": reverse}, consts={1})
    check("CumSum", [rng(5).integers(-9, 9, size=(4, 6)).astype(np.int32), np.array(-1, np.int32)],
          {"exclusive": exclusive, "reverse": reverse}, consts={1})


def test_norms():
    x = randn(2, 6, 5, 4)
    c = randn(6, seed=1)
    check("InstanceNormalization", [x, c, randn(6, seed=2)], consts={1, 2})
    check("BatchNormalization", [x, c, randn(6, seed=2), randn(6, seed=3), np.abs(c) + 0.2], consts={1, 2, 3, 4})
    check("BatchNormalization", [randn(4, 6), c, c, c, np.abs(c) + 0.2], {"epsilon": 0.1}, consts={1, 2, 3, 4})
    check("GroupNormalization", [x, randn(3, seed=1), randn(3, seed=2)], {"num_groups": 3}, consts={1, 2},
          opset=18)
    check("GroupNormalization", [x, c, randn(6, seed=2)], {"num_groups": 2, "epsilon": 1e-3}, consts={1, 2},
          opset=21)
    check("LayerNormalization", [x, randn(5, 4, seed=1), randn(4, seed=2)], {"axis": 2}, consts={1, 2}, n_out=3)
    check("LayerNormalization", [x, randn(4, seed=1)], {"epsilon": 1e-3}, consts={1})
    check("LpNormalization", [x], {"axis": 1, "p": 1})
    check("LpNormalization", [x], {"axis": -1, "p": 2})
    check("MeanVarianceNormalization", [x], {"axes": [0, 2, 3]})
    for size in (3, 5):  # (onnxruntime rejects even sizes)
        check("LRN", [x], {"size": size, "alpha": 0.01, "beta": 0.7, "bias": 1.5})


UNARY = ["Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Abs", "Neg", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
         "Softsign", "Softplus", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Mish", "Identity",
         "ThresholdedRelu", "Shrink", "IsNaN", "IsInf"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    x = randn(3, 4, 5) * 3
    x[0, 0, :3] = [0.5, -2.5, 1.5]  # Round: halves to even
    check(op, [x], opset=18)


def test_unary_with_domain_restrictions():
    x = np.abs(randn(3, 7)) + 0.1
    for op in ("Sqrt", "Log", "Reciprocal"):
        check(op, [x])
    check("LeakyRelu", [randn(3, 7)], {"alpha": 0.3})
    check("Elu", [randn(3, 7)], {"alpha": 0.4})
    check("Selu", [randn(3, 7)], {"alpha": 1.2, "gamma": 0.9})
    check("HardSigmoid", [randn(3, 7)], {"alpha": 0.3, "beta": 0.4})
    check("Gelu", [randn(3, 7)], opset=20)
    check("Gelu", [randn(3, 7)], {"approximate": "tanh"}, opset=20)
    check("PRelu", [randn(2, 4, 3, 3), randn(4, 1, 1, seed=1)], consts={1})
    check("Dropout", [randn(3, 7), np.array(0.5, np.float32)], consts={1}, n_out=2)
    check("Not", [randn(3, 7) > 0])
    check("Cast", [randn(3, 7) * 5], {"to": TensorProto.INT32})
    check("Cast", [randn(3, 7)], {"to": TensorProto.BOOL})
    check("CastLike", [randn(3, 7) * 5, np.zeros(1, np.int64)], consts={1}, opset=15)


def test_clip():
    x = randn(3, 7) * 4
    check("Clip", [x], {"min": -1.0, "max": 2.0}, opset=6)
    check("Clip", [x, f32(-0.5), f32(1.0)], consts={1, 2}, opset=13)
    check("Clip", [x, None, f32(1.0)], consts={2}, opset=13)
    check("Clip", [x, f32(3.0), f32(1.0)], consts={1, 2}, opset=13)  # min > max: all = max
    check("Clip", [rng(1).integers(-9, 9, size=(4,)), i64(-2)], consts={1}, opset=13)


BINARY = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Less", "Greater",
          "LessOrEqual", "GreaterOrEqual"]


@pytest.mark.parametrize("op", BINARY)
def test_binary_broadcast(op):
    a, b = randn(2, 3, 4), randn(3, 1, seed=1)
    if op == "Pow":
        a = np.abs(a) + 0.1
    check(op, [a, b])
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Less", "Greater"):
        check(op, [rng(2).integers(-9, 9, size=(2, 5)), rng(3).integers(1, 9, size=(5,))], opset=13)


def test_variadic_logic_where_mod():
    check("Sum", [randn(2, 3), randn(3, seed=1), randn(1, 3, seed=2)])
    check("Mean", [randn(2, 3), randn(3, seed=1), randn(2, 1, seed=2)])
    check("Max", [randn(2, 3)])
    a, b = randn(3, 4) > 0, randn(4, seed=1) > 0
    for op in ("And", "Or", "Xor"):
        check(op, [a, b])
    check("Where", [a, randn(3, 4, seed=2), randn(1, 4, seed=3)])
    ia, ib = rng(4).integers(-20, 20, size=(3, 4)), rng(5).integers(1, 7, size=(4,)) * np.array([1, -1, 1, -1])
    check("Mod", [ia, ib])
    check("Mod", [ia, ib], {"fmod": 1})
    check("Mod", [randn(3, 4) * 5, np.abs(randn(4, seed=1)) + 1], {"fmod": 1})
    check("Pow", [randn(3, 4), np.array(2, np.int64)], consts={1})
    check("BitShift", [np.array([1, 4, 16], np.uint8), np.array([1, 2, 3], np.uint8)], {"direction": "RIGHT"})


def test_shape_ops():
    x = randn(2, 3, 4, 5)
    check("Reshape", [x, i64(0, -1, 5)], consts={1})
    check("Reshape", [x, i64(1, 0, -1, 5)], consts={1})
    check("Reshape", [np.zeros((0, 3), np.float32), i64(3, 0)], {"allowzero": 1}, consts={1}, opset=14)
    check("Flatten", [x], {"axis": -1})
    check("Flatten", [x], {"axis": 0})
    check("Transpose", [x], {"perm": [0, 2, 3, 1]})
    check("Transpose", [x])
    check("Squeeze", [randn(1, 3, 1, 2)], {"axes": [0, -2]}, opset=11)
    check("Squeeze", [randn(1, 3, 1, 2), i64(2)], consts={1}, opset=13)
    check("Squeeze", [randn(1, 3, 1, 2)], opset=13)
    check("Squeeze", [randn(1, 3, 1, 2), np.zeros(0, np.int64)], consts={1}, opset=13)
    check("Unsqueeze", [randn(3, 2)], {"axes": [0, -1]}, opset=11)
    check("Unsqueeze", [randn(3, 2), i64(3, 1)], consts={1}, opset=13)
    check("Expand", [randn(3, 1), i64(2, 1, 4)], consts={1})
    check("Tile", [randn(2, 3), i64(2, 3)], consts={1})
    check("Shape", [x], {"start": 1, "end": -1}, opset=15)
    check("Shape", [x], {"start": -10}, opset=15)
    check("Size", [x])
    check("ConstantOfShape", [i64(2, 3)], {"value": helper.make_tensor("v", TensorProto.INT64, [1], [7])})
    check("ConstantOfShape", [i64(4)])
    check("Range", [np.array(1.0, np.float32), np.array(4.2, np.float32), np.array(0.7, np.float32)])
    check("Range", [np.array(10, np.int64), np.array(-3, np.int64), np.array(-4, np.int64)])
    check("DepthToSpace", [randn(1, 8, 2, 3)], {"blocksize": 2, "mode": "DCR"})
    check("DepthToSpace", [randn(1, 8, 2, 3)], {"blocksize": 2, "mode": "CRD"})
    check("SpaceToDepth", [randn(1, 2, 4, 6)], {"blocksize": 2})
    check("Trilu", [randn(2, 4, 5), np.array(1, np.int64)], {"upper": 0}, consts={1}, opset=14)
    check("OneHot", [i64(0, 2, -1), i64(4), f32(-1, 3)], {"axis": 0}, consts={1, 2})
    check("Einsum", [randn(2, 3, 4), randn(2, 4, 5, seed=1)], {"equation": "bij,bjk->bik"}, opset=12)
    check("NonZero", [np.array([[1, 0, 2], [0, 3, 0]], np.float32)])
    check("Concat", [randn(2, 3), randn(2, 1, seed=1), randn(2, 2, seed=2)], {"axis": -1})


@pytest.mark.parametrize("x", [np.arange(10, dtype=np.int64) * 3, randn(2, 5)], ids=["1d-int", "2d-float"])
def test_array_feature_extractor(x):
    """ai.onnx.ml ArrayFeatureExtractor (skl2onnx's classifiers map argmax to class labels with it): indices
    flattened, last axis, a 1-D X gives (1, len(Y)); compared with onnxruntime."""
    y = np.array([[3], [0], [4]], dtype=np.int64)
    xtype = helper.np_dtype_to_tensor_dtype(x.dtype)
    node = helper.make_node("ArrayFeatureExtractor", ["x", "y"], ["out0"], name="afe", domain="ai.onnx.ml")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", xtype, list(x.shape)),
                                            helper.make_tensor_value_info("y", TensorProto.INT64, [3, 1])],
                              [helper.make_tensor_value_info("out0", xtype, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)],
                              ir_version=10)
    feeds = {"x": x, "y": y}
    ref = ort_run(model, feeds)[0]
    assert ref.shape == ((1, 3) if x.ndim == 1 else (2, 3))
    with torch.no_grad():
        got = TorchGraph(model).run({k: torch.from_numpy(v) for k, v in feeds.items()})
    assert_close(ref, got["out0"], "ArrayFeatureExtractor")


# ---- 4. errors and the module API --------------------------------------------------------------------------------
def test_missing_lowering_is_a_clear_error():
    model, _ = op_model("NonMaxSuppression", [randn(1, 4, 4), randn(1, 1, 4)], opset=17)
    with pytest.raises(SpaError, match=r"NonMaxSuppression.*nonmaxsuppression_node"):
        TorchGraph(model)
    model, _ = op_model("MyOp", [randn(2)], domain="my.domain")
    with pytest.raises(SpaError, match=r"my\.domain::MyOp"):
        TorchGraph(model)


def test_subgraph_op_is_a_clear_error():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["c"], ["out"], name="the_if", then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    with pytest.raises(SpaError, match="the_if.*If.*subgraph"):
        TorchGraph(model)


def test_registry_api():
    assert lowering("Conv") is LOWERINGS[("", "Conv")]
    assert lowering("Conv", "ai.onnx") is LOWERINGS[("", "Conv")]
    assert lowering("Conv", "com.microsoft") is None
    assert lowering("ArrayFeatureExtractor", "ai.onnx.ml") is not None
    assert lowering("ArrayFeatureExtractor") is None
    assert lowering("NoSuchOp") is None

    @lower("_TestOnlyOp")
    def _fn(node, inputs, attrs):
        return [inputs[0] * 2]

    try:
        assert lowering("_TestOnlyOp") is _fn
    finally:
        del LOWERINGS[("", "_TestOnlyOp")]


def small_net():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "w2"], ["y"], name="add_shared"),  # w2 read by two nodes
             helper.make_node("Shape", ["y"], ["s"], name="shape")]
    inits = [onnx.numpy_helper.from_array(randn(4, 3, 3, 3), "w"), onnx.numpy_helper.from_array(randn(4), "b"),
             onnx.numpy_helper.from_array(randn(1, 4, 1, 1, seed=1), "w2")]
    return make_model(nodes, inits, [("x", [2, 3, 6, 6])], ["y", ("s", TensorProto.INT64)])


def test_run_hook_keep_and_freeing():
    model = small_net()
    tg = TorchGraph(model)
    assert set(tg.param_names) == {"w", "b", "w2"}
    assert tg.param("w2") is tg.param_names["w2"]
    x = torch.from_numpy(randn(2, 3, 6, 6))
    seen = []

    def hook(node, inputs, outputs):
        seen.append((node.name, [tuple(t.shape) for t in inputs], [tuple(t.shape) for t in outputs]))

    res = tg.run({"x": x}, hook=hook, keep={"r"})
    assert [s[0] for s in seen] == ["conv", "relu", "conv2", "add_shared", "shape"]
    assert seen[0][1] == [(2, 3, 6, 6), (4, 3, 3, 3), (4,)]
    assert set(res) == {"y", "s", "r"}
    assert res["s"].tolist() == [2, 4, 6, 6] and res["s"].dtype == torch.int64
    assert_close(ort_run(model, {"x": x.numpy()})[0], res["y"])

    # run frees an intermediate once its last consumer ran, unless kept
    refs, alive = {}, {}

    def watch(node, inputs, outputs):
        refs.update((o, weakref.ref(t)) for o, t in zip(node.output, outputs))
        if node.name == "add_shared":
            alive.update((k, r() is not None) for k, r in refs.items())

    with torch.no_grad():
        tg.run({"x": x}, hook=watch, keep={"c"})
    assert alive == {"c": True, "r": False, "c2": True, "y": True}  # c2 and y: inputs/outputs of add_shared

    # node by node: step stores every output and frees nothing
    env = tg.initial_env({"x": x})
    for node in tg.nodes:
        tg.step(node, env)
    assert {"c", "r", "c2", "y", "s"} <= set(env)
    assert torch.equal(env["y"], res["y"])
    y, s = tg(x)
    assert torch.equal(y, res["y"]) and torch.equal(s, res["s"])
    y2, _ = tg(x=x)
    assert torch.equal(y2, y)
    with pytest.raises(SpaError, match="missing graph input"):
        tg.run({})


def test_state_dict_onnx_roundtrip():
    model = small_net()
    tg = TorchGraph(model)
    with torch.no_grad():
        tg.param("w").mul_(2.0)
    sd = tg.state_dict_onnx()
    assert set(sd) == {"w", "b", "w2"}
    w0 = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    np.testing.assert_allclose(sd["w"], 2 * w0)
    assert sd["w"].dtype == np.float32
    # written back, onnxruntime sees the new weights
    for t in model.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(sd[t.name], t.name))
    x = randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(ort_run(model, {"x": x})[0], tg(torch.from_numpy(x))[0])


def test_half_model_runs_in_float32():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["c"], ["c32"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["c32"], ["y"], to=TensorProto.FLOAT16)]
    w = (randn(4, 3, 3, 3) * 0.3).astype(np.float16)
    model = make_model(nodes, [onnx.numpy_helper.from_array(w, "w")], [("x", [1, 3, 5, 5], TensorProto.FLOAT16)],
                       [("y", TensorProto.FLOAT16)])
    tg = TorchGraph(model)
    assert tg.param("w").dtype == torch.float32
    x = randn(1, 3, 5, 5).astype(np.float16)
    with torch.no_grad():
        y = tg(torch.from_numpy(x))
    assert y.dtype == torch.float32
    ref = ort_run(model, {"x": x})[0]
    assert np.abs(ref.astype(np.float32) - y.numpy()).max() <= 2e-3 * np.abs(ref).max()
    assert tg.state_dict_onnx()["w"].dtype == np.float16


def test_constants_and_spa_graph():
    path = models.zoo_path("mobilenet_v2", small=True)
    model = onnx.load(str(path))
    assert any(n.op_type == "Constant" for n in model.graph.node)
    tg = TorchGraph(model)
    assert all(n.op_type != "Constant" for n in tg.nodes)
    n_float = sum(t.data_type == TensorProto.FLOAT for t in model.graph.initializer)
    assert len(tg.param_names) == n_float
    # a spa Model (normalized) is accepted as well as its Graph
    m = driver.load(str(path))
    assert len(TorchGraph(m).param_names) == len(TorchGraph(m.graph).param_names)


def test_unsupported_attribute_is_refused_up_front():
    model, _ = op_model("Resize", [X4, None, np.array([1, 1, 0.5, 0.5], np.float32)],
                        {"mode": "linear", "antialias": 1}, consts={2}, opset=18)
    with pytest.raises(SpaError, match="resize_node.*antialias"):
        TorchGraph(model)


# ---- opset 23: Attention, RotaryEmbedding, RMSNormalization --------------------------------------------------------
ATTENTION = [  # (q, k, v shapes, attrs, mask shape/dtype or None, past length)
    pytest.param((2, 4, 5, 8), (2, 4, 5, 8), (2, 4, 5, 6), {}, None, 0, id="mha-4d"),
    pytest.param((2, 4, 5, 8), (2, 2, 5, 8), (2, 2, 5, 8), {"is_causal": 1}, None, 0, id="gqa-4d-causal"),
    pytest.param((2, 4, 3, 8), (2, 2, 3, 8), (2, 2, 3, 8), {"is_causal": 1}, None, 4, id="gqa-causal-past"),
    pytest.param((2, 4, 5, 8), (2, 1, 5, 8), (2, 1, 5, 8), {"scale": 0.3, "softcap": 2.0}, ((5, 5), "f"), 0,
                 id="mqa-scale-softcap-mask"),
    pytest.param((2, 5, 32), (2, 5, 16), (2, 5, 16), {"q_num_heads": 4, "kv_num_heads": 2}, ((2, 4, 5, 5), "b"), 0,
                 id="gqa-3d-bool-mask"),
    pytest.param((1, 3, 16), (1, 3, 16), (1, 3, 16), {"q_num_heads": 2, "kv_num_heads": 2, "is_causal": 1},
                 ((3, 5), "f"), 2, id="3d-causal-past-mask"),
]


@pytest.mark.parametrize("q, k, v, attrs, mask, past", ATTENTION)
def test_attention(q, k, v, attrs, mask, past):
    inputs = [randn(*q, seed=1), randn(*k, seed=2), randn(*v, seed=3)]
    n_out = 1
    m = None
    if mask is not None:
        shape, kind = mask
        m = randn(*shape, seed=4) if kind == "f" else rng(4).random(shape) < 0.7
        if kind == "b":
            m[..., 0] = True  # every row sees one key
    if mask is not None or past:
        inputs.append(m)
    if past:
        hkv = k[1] if len(k) == 4 else attrs["kv_num_heads"]
        hs = k[-1] if len(k) == 4 else k[-1] // hkv
        vhs = v[-1] if len(v) == 4 else v[-1] // hkv
        inputs += [randn(k[0], hkv, past, hs, seed=5), randn(v[0], hkv, past, vhs, seed=6)]
        n_out = 3
    check("Attention", inputs, attrs, n_out=n_out, opset=23)


def test_attention_scores_output_is_refused():
    model, _ = op_model("Attention", [randn(1, 2, 3, 4), randn(1, 2, 3, 4), randn(1, 2, 3, 4)], opset=23, n_out=4)
    with pytest.raises(SpaError, match="qk_matmul_output"):
        TorchGraph(model)


ROTARY = [  # (x shape, attrs, with position_ids)
    pytest.param((2, 3, 5, 8), {}, True, id="4d-positions"),
    pytest.param((2, 3, 5, 8), {"interleaved": 1}, True, id="4d-interleaved"),
    pytest.param((2, 5, 24), {"num_heads": 3}, True, id="3d"),
    pytest.param((2, 3, 5, 8), {"rotary_embedding_dim": 4}, True, id="4d-partial"),
    pytest.param((2, 5, 24), {"num_heads": 3, "interleaved": 1}, False, id="3d-caches-per-token"),
]


@pytest.mark.parametrize("shape, attrs, positions", ROTARY)
def test_rotary_embedding(shape, attrs, positions):
    head = shape[-1] if len(shape) == 4 else shape[-1] // attrs["num_heads"]
    half = (attrs.get("rotary_embedding_dim") or head) // 2
    if positions:
        cos, sin = randn(16, half, seed=2), randn(16, half, seed=3)
        pos = rng(4).integers(0, 16, size=(shape[0], shape[-2] if len(shape) == 4 else shape[1])).astype(np.int64)
        check("RotaryEmbedding", [randn(*shape, seed=1), cos, sin, pos], attrs, opset=23)
    else:
        seq = shape[1]
        check("RotaryEmbedding", [randn(*shape, seed=1), randn(shape[0], seq, half, seed=2),
                                  randn(shape[0], seq, half, seed=3)], attrs, opset=23)


@pytest.mark.parametrize("axis", [-1, 1])
def test_rms_normalization(axis):
    check("RMSNormalization", [randn(2, 3, 4, seed=1), randn(*(4,) if axis == -1 else (3, 4), seed=2)],
          {"axis": axis, "epsilon": 1e-3}, opset=23)


# ---- Relu/Add written into a dying input (TorchGraph.step's `reuse`) ------------------------------------------------
def _inplace_net():
    """x -> Relu (a feed: never in place); c1 -> Relu (dies there: in place); c1b -> Identity and Relu (an alias
    outlives the Relu: not in place); the residual Add of two fresh tensors (in place)."""
    from helpers import Builder

    b = Builder()
    x = b.relu(b.input("x", [2, 3, 8, 8]))
    a = b.relu(b.conv("c1", x, 3, 4))
    c = b.conv("c1b", x, 3, 4)
    alias = b.op("Identity", [c])
    r = b.relu(c)
    y = b.op("Add", [b.conv("c2", a, 4, 4), r])
    b.output(b.op("Add", [y, alias]))
    return b.model()


def test_relu_and_add_in_place_only_where_the_input_dies_unshared():
    import torch

    from spa import execution
    from spa.torch_graph import TorchGraph

    tg = TorchGraph(_inplace_net())
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    kept = x.copy()
    want = tg.run({"x": x})[tg.output_names[0]]
    seen = {}

    def hook(node, k, ins, outs):
        seen[node.output[0]] = (node.op_type, [t.untyped_storage().data_ptr() if t is not None else None for t in ins],
                                outs[0].untyped_storage().data_ptr())

    with torch.no_grad():
        got = {}
        execution.run_layerwise(tg, [{"x": x}], lambda n, k, i, o: (hook(n, k, i, o), got.update(zip(n.output, o))))
    np.testing.assert_array_equal(x, kept)                        # the feed was not written
    torch.testing.assert_close(got[tg.output_names[0]], want, rtol=0, atol=0)
    in_place = {name for name, (op, ins, out) in seen.items() if op in ("Relu", "Add") and out in ins}
    relus = [name for name, (op, _, _) in seen.items() if op == "Relu"]
    adds = [name for name, (op, _, _) in seen.items() if op == "Add"]
    assert relus[0] not in in_place          # Relu(x): x is a feed
    assert relus[1] in in_place              # Relu(c1): dies there, nothing shares it
    assert relus[2] not in in_place          # Relu(c1b): the Identity's alias is still alive
    assert adds[0] in in_place and adds[1] in in_place


def test_broadcasts_into_follows_numpy():
    from spa.torch_graph import broadcasts_into

    shapes = [(), (1,), (4,), (3, 1), (1, 4), (3, 4), (2, 3, 4), (2, 1, 4), (5, 4), (1, 1, 1, 4)]
    for a in shapes:
        for target in shapes:
            try:
                fits = np.broadcast_shapes(a, target) == tuple(target)
            except ValueError:
                fits = False
            assert broadcasts_into(a, target) == fits, (a, target)
