"""The per-operator tables agree with each other, and a user can register an operator of their own.

An operator's knowledge lives in several tables (docs/operators.md): its propagation rule (spa.operators.RULES),
its torch lowering (spa.lowering.LOWERINGS), its constant folder (spa.passes.fold.FOLDERS), the weight-layer
table (spa.operators.weights) and the search's op categories (spa.search.graph._CAT). These tests fail when one
table learns an operator the others do not know, unless the difference is listed below with its reason.

The registration test builds Conv -> com.example::MyScale -> Relu -> Conv, MyScale being a model-local ONNX
function (onnxruntime inlines it, so verification runs): unknown, it freezes the channels through it; registered
with a passthrough rule and a torch lowering, spa prunes through it, verifies, and runs it in torch.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx.defs
import pytest
from helpers import Builder, analyse, group_of, make_model, rand, tensor
from onnx import TensorProto, helper

from spa import driver, operators
from spa.errors import SpaError
from spa.labels import passthrough
from spa.operators.weights import BIAS_INPUT, WEIGHT_INPUT, is_weight_layer, weight_input
from spa.passes.fold import FOLDERS
from spa.search.graph import _CAT

torch = pytest.importorskip("torch")
from spa.lowering import LOWERINGS, lowering  # noqa: E402  (torch)
from spa.torch_graph import TorchGraph  # noqa: E402

# Ops with a propagation rule but no torch lowering. TorchGraph refuses a model that has one, naming it.
RULE_WITHOUT_LOWERING = {
    ("", "MaxRoiPool"),  # region pooling over an ROI list: never met in a model we run in torch
    ("", "If"), ("", "Loop"), ("", "Scan"),  # control flow: TorchGraph does not run bodies yet (the data passes refuse)
}
# Ops with a torch lowering but no propagation rule: the analysis freezes channels that reach them, which is
# right for all of them (they make constants or shapes, or move channels in ways no rule expresses).
LOWERING_WITHOUT_RULE = {
    ("", "Constant"), ("", "ConstantOfShape"), ("", "Range"), ("", "Size"), ("", "NonZero"),  # constants/shapes
    ("", "OneHot"), ("", "Trilu"), ("", "GatherElements"), ("", "Einsum"),  # index / contraction patterns
    ("", "GatherND"), ("", "ScatterND"), ("", "ScatterElements"),  # masks, last-token picks: they freeze channels
    ("", "DepthToSpace"), ("", "SpaceToDepth"),  # channels <-> space: a channel becomes a block of pixels
    ("", "Tan"), ("", "BitwiseNot"),  # element-wise ops no exporter of ours emits on channels (yet)
    ("ai.onnx.ml", "ArrayFeatureExtractor"),  # label lookup after a classifier (skl2onnx), no channels
}
# Keys that are not operators of their domain in onnx.defs.
NOT_ONNX = {
    ("", "Relu6"),  # not an ONNX op (onnxruntime would not load it); kept as it was, a clip to [0, 6]
    # onnxruntime's contrib kernels that its quantizer emits (operators/quantized.py): no onnx.defs schema
    *(("com.microsoft", op) for op in ("QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                                       "QLinearSigmoid", "QLinearLeakyRelu")),
}


def _name(key):
    d, op = key
    return f"{d}::{op}" if d else op


def test_rules_have_lowerings():
    missing = sorted(k for k in operators.RULES if k not in LOWERINGS and k not in RULE_WITHOUT_LOWERING)
    assert not missing, f"propagation rule but no torch lowering (add one, or list it): {[_name(k) for k in missing]}"
    stale = sorted(k for k in RULE_WITHOUT_LOWERING if k in LOWERINGS or k not in operators.RULES)
    assert not stale, f"RULE_WITHOUT_LOWERING lists {[_name(k) for k in stale]}, which no longer applies"


def test_lowerings_have_rules():
    missing = sorted(k for k in LOWERINGS if k not in operators.RULES and k not in LOWERING_WITHOUT_RULE)
    assert not missing, f"torch lowering but no propagation rule (add one, or list it): {[_name(k) for k in missing]}"
    stale = sorted(k for k in LOWERING_WITHOUT_RULE if k in operators.RULES or k not in LOWERINGS)
    assert not stale, f"LOWERING_WITHOUT_RULE lists {[_name(k) for k in stale]}, which no longer applies"


def test_registry_keys_are_onnx_ops():
    for table, keys in (("RULES", operators.RULES), ("LOWERINGS", LOWERINGS)):
        for domain, op in keys:
            assert domain == operators.canonical_domain(domain), f"{table}: domain {domain!r} is not canonical"
            real = onnx.defs.has(op, domain)
            assert real != ((domain, op) in NOT_ONNX), f"{table}: {_name((domain, op))} onnx.defs.has={real}"


def test_folders_are_onnx_ops():
    unknown = [op for op in FOLDERS if not onnx.defs.has(op)]
    assert not unknown, f"passes/fold.py FOLDERS: not ONNX ops: {unknown}"


def test_search_categories_and_weight_layers_have_rules():
    for op in _CAT:
        assert operators.lookup(op) is not None, f"spa/search/graph.py _CAT: {op} has no propagation rule"
    for op in WEIGHT_INPUT:
        assert operators.lookup(op) is not None, f"weight layer {op} has no propagation rule"
        assert ("", op) in LOWERINGS, f"weight layer {op} has no torch lowering"
    assert set(BIAS_INPUT) <= set(WEIGHT_INPUT)


def test_canonical_domain():
    assert operators.canonical_domain("ai.onnx") == operators.canonical_domain("") == ""
    assert operators.lookup("Conv", "ai.onnx") is operators.lookup("Conv") is operators.RULES[("", "Conv")]
    assert operators.lookup("Conv", "com.microsoft") is None
    assert lowering("Relu", "ai.onnx") is lowering("Relu") is not None


# ---- the weight-layer helper agrees with the rules ---------------------------------------------------------------
def _weight_layer_zoo() -> onnx.ModelProto:
    """One node of every weight-layer form, and look-alikes that are not weight layers, each reading `x`."""
    nodes, inits = [], []

    def w(name, shape):
        inits.append(tensor(name, rand(name, shape)))
        return name

    nodes.append(helper.make_node("Conv", ["x", w("cw", (6, 4, 3, 3)), w("cb", (6,))], ["conv"], name="conv"))
    nodes.append(helper.make_node("ConvTranspose", ["x", w("tw", (4, 5, 2, 2))], ["convt"], name="convt",
                                  strides=[2, 2]))
    nodes.append(helper.make_node("Conv", ["x", "x4"], ["conv_rt"], name="conv_runtime_weight"))
    nodes.append(helper.make_node("Flatten", ["x"], ["f"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["f", w("gw", (7, 64)), w("gb", (7,))], ["gemm"], name="gemm", transB=1))
    nodes.append(helper.make_node("Gemm", ["f", w("gw2", (64, 3))], ["gemm2"], name="gemm_nt"))
    nodes.append(helper.make_node("Gemm", [w("ga", (2, 1)), "f1"], ["gemm_ca"], name="gemm_const_a"))
    nodes.append(helper.make_node("MatMul", ["x", w("mw", (4, 5))], ["mm_right"], name="matmul_right"))
    nodes.append(helper.make_node("MatMul", [w("mwl", (3, 4)), "x"], ["mm_left"], name="matmul_left"))
    nodes.append(helper.make_node("MatMul", ["x", "x4"], ["mm_act"], name="matmul_activations"))
    nodes.append(helper.make_node("MatMul", ["x", w("mw3", (1, 4, 5))], ["mm_batched"], name="matmul_batched"))
    inputs = [("x", [1, 4, 4, 4]), ("x4", [1, 4, 4, 4]), ("f1", [1, 3])]
    outputs = ["conv", "convt", "conv_rt", "gemm", "gemm2", "gemm_ca", "mm_right", "mm_left", "mm_act", "mm_batched"]
    return make_model(nodes, inits, inputs, outputs)


def test_weight_layer_helper_agrees_with_the_rules():
    model, analysis = analyse(_weight_layer_zoo())
    g = model.graph
    source_weight = {s.node: s.weight for s in analysis.ctx.sources}
    expected = {"conv": 1, "convt": 1, "conv_runtime_weight": None, "flatten": None, "gemm": 1, "gemm_nt": 1,
                "gemm_const_a": None, "matmul_right": 1, "matmul_left": 0, "matmul_activations": None,
                "matmul_batched": None}
    seen = set()
    for node in analysis.nodes:
        seen.add(node.name)
        slot = weight_input(node, g)
        assert slot == expected[node.name], node.name
        assert is_weight_layer(node, g) == (node.name in source_weight), node.name
        if slot is not None:
            assert source_weight[node.name] == node.input[slot], node.name
        assert weight_input(node) == WEIGHT_INPUT.get(node.op_type)
    assert seen == set(expected)
    other_domain = helper.make_node("Conv", ["x", "cw"], ["y"], domain="com.example")
    assert weight_input(other_domain) is None and not is_weight_layer(other_domain, g)


# ---- registering a custom-domain operator ------------------------------------------------------------------------
def _myscale_model() -> onnx.ModelProto:
    """Conv(3->8) -> com.example::MyScale(alpha=0.5) -> Relu -> Conv(8->4); MyScale(X) = X * alpha is a
    model-local function, which onnxruntime inlines."""
    const = helper.make_node("Constant", [], ["a"])
    const.attribute.append(helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT))
    const.attribute[0].ref_attr_name = "alpha"
    fn = helper.make_function("com.example", "MyScale", ["X"], ["Y"], [const, helper.make_node("Mul", ["X", "a"], ["Y"])],
                              [helper.make_opsetid("", 17)], attributes=["alpha"])
    b = Builder()
    y = b.conv("c1", "x", 3, 8)
    y = b.op("MyScale", [y], name="myscale", domain="com.example", alpha=0.5)
    y = b.conv("c2", b.relu(y), 8, 4)
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 8, 8])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                              functions=[fn], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _myscale_lowering(node, inputs, attrs):
    return [inputs[0] * float(attrs.get("alpha", 1.0))]


def test_unregistered_custom_op_freezes(tmp_path):
    model = _myscale_model()
    _, analysis = analyse(model)
    g = group_of(analysis, "c1")
    assert g.size == 8 and g.prunable == 0
    assert ("MyScale 'myscale'", "no propagation rule for this operator") in g.reasons
    assert analysis.unruled_ops == {"com.example.MyScale": 1}
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(SpaError, match="no propagation rule"):
        driver.prune(str(path), str(tmp_path / "out.onnx"), ratio=0.5)
    with pytest.raises(SpaError, match=r"com\.example::MyScale"):
        TorchGraph(model)


def test_register_custom_domain_op(tmp_path):
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_myscale_model(), path)
    with operators.register("MyScale", domain="com.example", rule=passthrough, lowering=_myscale_lowering):
        assert operators.lookup("MyScale", "com.example") is passthrough
        assert lowering("MyScale", "com.example") is _myscale_lowering
        assert operators.lookup("MyScale") is None  # the default domain's MyScale is another op
        _, analysis = analyse(onnx.load(path))
        g = group_of(analysis, "c1")
        assert (g.size, g.prunable, g.reasons) == (8, 8, [])
        res = driver.prune(str(path), str(out), ratio=0.5)
        assert res.report["verification"]["status"] == "passed"
        pruned = onnx.load(out)
        assert {t.name: list(t.dims) for t in pruned.graph.initializer if t.name.startswith("c1")} == \
            {"c1.weight": [4, 3, 3, 3], "c1.bias": [4]}
        assert [f.name for f in pruned.functions] == ["MyScale"]
        assert [n.op_type for n in pruned.graph.node if n.domain == "com.example"] == ["MyScale"]
        x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
        import onnxruntime as ort
        ref = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        with torch.no_grad():
            got = TorchGraph(pruned)(torch.from_numpy(x)).numpy()
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert operators.lookup("MyScale", "com.example") is None
    assert lowering("MyScale", "com.example") is None


def test_register_refuses_to_shadow_and_restores():
    with pytest.raises(ValueError, match="already has a rule"):
        operators.register("Relu", rule=passthrough)
    with pytest.raises(ValueError, match="rule, a lowering"):
        operators.register("Nothing", domain="com.example")
    builtin_rule, builtin_lowering = operators.lookup("Relu"), lowering("Relu")
    reg = operators.register("Relu", domain="ai.onnx", rule=passthrough, lowering=_myscale_lowering, replace=True)
    assert operators.lookup("Relu") is passthrough and lowering("Relu") is _myscale_lowering
    reg.undo()
    assert operators.lookup("Relu") is builtin_rule and lowering("Relu") is builtin_lowering
    operators.register("MyScale", domain="com.example", rule=passthrough, lowering=_myscale_lowering)
    operators.unregister("MyScale", domain="com.example")
    assert operators.lookup("MyScale", "com.example") is None and lowering("MyScale", "com.example") is None


def test_registering_a_rule_does_not_import_torch():
    code = ("import sys\nfrom spa import operators\nfrom spa.labels import passthrough\n"
            "with operators.register('MyScale', domain='com.example', rule=passthrough):\n"
            "    assert operators.lookup('MyScale', 'com.example') is passthrough\n"
            "operators.unregister('MyScale', domain='com.example')\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
