"""One or more small-graph tests per operator family rule (operators/*.py).

Each test asserts exact numbers: the coupled groups (count, sizes, frozen units and the op named in the freeze
reason), the exact pruned weight shapes after --ratio 0.5 (floor(0.5*n + 0.5) units removed per group), rewritten
attributes / shape constants, and that verification passes (prune_and_check also runs the pruned model against
the original in onnxruntime). Where index bookkeeping matters (Concat offsets, Split/Slice/Gather, Flatten blocks,
attention heads), chosen channels are made exactly dead in every parameter they own, so that l2 importance
removes exactly those and the pruned model must equal the ORIGINAL model: an independent check of the offsets.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (
    Builder,
    analyse,
    group_of,
    make_model,
    node_attr,
    param_shapes,
    param_value,
    prune_and_check,
    rand,
    reasons_text,
    removed_count,
    zeroed,
)
from onnx import TensorProto, helper

from spa import driver
from spa.errors import SpaError


def assert_groups(analysis, expected: dict):
    """expected: {a source node of the group: (size, frozen units, substring of the freeze reasons or None)}."""
    assert len(analysis.groups) == len(expected), [(g.sources, g.size, int(g.frozen.sum())) for g in analysis.groups]
    seen = set()
    for src, (size, frozen, why) in expected.items():
        g = group_of(analysis, src)
        assert g.id not in seen, f"{src} shares a group with another expected source"
        seen.add(g.id)
        assert g.size == size, (src, g.size)
        assert int(g.frozen.sum()) == frozen, (src, int(g.frozen.sum()), reasons_text(g))
        if why is None:
            assert not g.reasons, reasons_text(g)
        else:
            assert why in reasons_text(g), reasons_text(g)


def assert_shapes(model, expected: dict):
    """expected: {(node name, input index): shape}."""
    got = param_shapes(model)
    for key, shape in expected.items():
        assert got[key] == tuple(shape), (key, got[key], shape)


OUT = "graph output"  # the freeze reason of a group whose channels reach a graph output


def test_removed_count_rule():
    assert [removed_count(n, 0.5) for n in (1, 2, 3, 4, 5, 6, 8)] == [1, 1, 2, 2, 3, 3, 4]


# ---- Conv ---------------------------------------------------------------------------------------------------------
def test_conv_chain():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c1", 2): (4,), ("c2", 1): (4, 4, 3, 3), ("c2", 2): (4,)})
    assert res.report["groups"] == {"total": 2, "pruned": 1, "frozen": 1, "partially_frozen": 0, "coarse_spared": []}
    # MACs: c1 8*3*9*64 + c2 4*8*9*64 -> c1 halves, c2 input halves
    assert res.report["macs"]["before"] == 8 * 3 * 9 * 64 + 4 * 8 * 9 * 64
    assert res.report["macs"]["after"] == 4 * 3 * 9 * 64 + 4 * 4 * 9 * 64


def test_conv_depthwise():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.relu(b.conv("dw", y, 8, 8, group=8))
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    assert group_of(analysis, "c1").sources == ["c1", "dw"]
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("dw", 1): (4, 1, 3, 3), ("dw", 2): (4,),
                               ("c2", 1): (4, 4, 3, 3)})
    assert node_attr(res.pruned, "dw", "group") == 4


@pytest.mark.parametrize("cout", [8, 16])
def test_conv_grouped_removes_whole_groups(cout):
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.relu(b.conv("gc", y, 8, cout, group=4))
    b.output(b.conv("c2", y, cout, 4))
    m = b.model()
    _, analysis = analyse(m)
    # one unit per conv group: 2 input + cout/4 output channels
    assert_groups(analysis, {"c1": (4, 0, None), "c2": (4, 4, OUT)})
    assert group_of(analysis, "c1").sources == ["c1", "gc"]
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("gc", 1): (cout // 2, 2, 3, 3), ("gc", 2): (cout // 2,),
                               ("c2", 1): (4, cout // 2, 3, 3)})
    assert node_attr(res.pruned, "gc", "group") == 2


def test_conv_depthwise_channel_multiplier():
    """Depthwise with multiplier 2 (group=4, 4 -> 8): a unit is one input channel and its two outputs."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 4))
    y = b.relu(b.conv("dw", y, 4, 8, group=4))
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (4, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (2, 3, 3, 3), ("dw", 1): (4, 1, 3, 3), ("dw", 2): (4,),
                               ("c2", 1): (4, 4, 3, 3)})
    assert node_attr(res.pruned, "dw", "group") == 2


def test_conv_grouped_on_graph_input_frozen():
    b = Builder()
    x = b.input("x", [1, 4, 8, 8])
    y = b.relu(b.conv("gc", x, 4, 8, group=2))
    b.output(b.conv("c2", y, 8, 4))
    _, analysis = analyse(b.model())
    assert_groups(analysis, {"gc": (8, 8, "Conv 'gc': grouped conv"), "c2": (4, 4, OUT)})


def test_conv_grouped_dead_groups_match_original():
    """Conv groups 1 and 2 dead in every parameter: exactly those go and the output is unchanged."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.relu(b.conv("gc", y, 8, 8, group=4))
    b.output(b.conv("c2", y, 8, 4))
    dead = [2, 3, 4, 5]  # channels of conv groups 1 and 2
    m = zeroed(b.model(), {"c1.weight": (0, dead), "c1.bias": (0, dead), "gc.weight": (0, dead),
                           "gc.bias": (0, dead), "c2.weight": (1, dead)})
    res = prune_and_check(m, 0.5, equal_original=True)
    assert node_attr(res.pruned, "gc", "group") == 2
    np.testing.assert_array_equal(param_value(res.pruned, "gc", 1), param_value(m, "gc", 1)[[0, 1, 6, 7]])


def test_conv1d():
    b = Builder()
    x = b.input("x", [1, 3, 16])
    y = b.relu(b.conv("c1", x, 3, 8, dims=1))
    b.output(b.conv("c2", y, 8, 4, dims=1))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3), ("c1", 2): (4,), ("c2", 1): (4, 4, 3)})


def test_conv3d():
    b = Builder()
    x = b.input("x", [1, 2, 4, 6, 6])
    y = b.relu(b.conv("c1", x, 2, 6, dims=3))
    b.output(b.conv("c2", y, 6, 4, dims=3))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (6, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (3, 2, 3, 3, 3), ("c1", 2): (3,), ("c2", 1): (4, 3, 3, 3, 3)})


def test_conv_transpose():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.relu(b.conv_t("up", y, 8, 6))
    b.output(b.conv("c2", y, 6, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "up": (6, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    # ConvTranspose weight is (C_in, C_out/group, k, k): input channels axis 0, output channels axis 1
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("up", 1): (4, 3, 2, 2), ("up", 2): (3,),
                               ("c2", 1): (4, 3, 3, 3)})


def test_conv_transpose_grouped():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.relu(b.conv_t("up", y, 8, 8, group=4))
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (4, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("up", 1): (4, 2, 2, 2), ("up", 2): (4,),
                               ("c2", 1): (4, 4, 3, 3)})
    assert node_attr(res.pruned, "up", "group") == 2


def test_conv_transpose_output_shape_attribute_rewritten():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    b.weight("up.weight", (8, 6, 2, 2))
    y = b.op("ConvTranspose", [y, "up.weight"], name="up", kernel_shape=[2, 2], strides=[2, 2],
             output_shape=[16, 16])  # spatial dims only (onnx shape inference rejects N, C in it)
    b.output(b.conv("c2", b.relu(y), 6, 4))
    m = b.model()
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("up", 1): (4, 3, 2, 2), ("c2", 1): (4, 3, 3, 3)})
    assert list(node_attr(res.pruned, "up", "output_shape")) == [16, 16]


# ---- normalizations -----------------------------------------------------------------------------------------------
def test_batchnorm():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.bn("bn", b.conv("c1", x, 3, 8), 8))
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("bn", 1): (4,), ("bn", 2): (4,), ("bn", 3): (4,),
                               ("bn", 4): (4,), ("c2", 1): (4, 4, 3, 3)})


def test_instancenorm():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.conv("c1", x, 3, 8)
    y = b.op("InstanceNormalization", [y, b.weight("in.scale", (8,), positive=True),
                                       b.weight("in.bias", (8,), 0.1)], name="in", epsilon=1e-5)
    b.output(b.conv("c2", b.relu(y), 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("in", 1): (4,), ("in", 2): (4,), ("c2", 1): (4, 4, 3, 3)})


def frozen_middle(mid, c_mid=8, opset=17, hw=8):
    """x -> c0 (3->6) -> relu -> c1 (6->c_mid) -> mid -> c2 (->4) -> output: c0 stays prunable."""
    b = Builder(opset)
    x = b.input("x", [1, 3, hw, hw])
    y = b.relu(b.conv("c0", x, 3, 6))
    y, c_out = mid(b, b.conv("c1", y, 6, c_mid))
    b.output(b.conv("c2", y, c_out, 4))
    return b.model()


def test_layernorm_over_channels_frozen():
    def mid(b, y):  # normalizes over (C, H, W)
        return b.op("LayerNormalization", [y, b.weight("ln.scale", (8, 8, 8), positive=True),
                                           b.weight("ln.bias", (8, 8, 8), 0.1)], name="ln", axis=1), 8

    m = frozen_middle(mid)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "LayerNormalization 'ln'"), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c0", 1): (3, 3, 3, 3), ("c1", 1): (8, 3, 3, 3), ("ln", 1): (8, 8, 8),
                               ("c2", 1): (4, 8, 3, 3)})


def test_layernorm_over_channel_last_axis_frozen():
    """(N, H, W, C) layout, LayerNorm over the last axis = the channel axis: channel-mixing."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c0", x, 3, 6))
    y = b.op("Transpose", [b.conv("c1", y, 6, 8)], perm=[0, 2, 3, 1])
    y = b.op("LayerNormalization", [y, b.weight("ln.scale", (8,), positive=True), b.weight("ln.bias", (8,), .1)],
             name="ln", axis=-1)
    y = b.op("Transpose", [y], perm=[0, 3, 1, 2])
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "LayerNormalization 'ln'"), "c2": (4, 4, OUT)})
    prune_and_check(m, 0.5)


def test_layernorm_over_other_axis():
    b = Builder()
    x = b.input("x", [1, 3, 5, 5])
    y = b.conv("c1", x, 3, 8)
    y = b.op("LayerNormalization", [y, b.weight("ln.scale", (5,), positive=True), b.weight("ln.bias", (5,), .1)],
             name="ln", axis=-1)
    b.output(b.conv("c2", b.relu(y), 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("ln", 1): (5,), ("ln", 2): (5,), ("c2", 1): (4, 4, 3, 3)})


def test_groupnorm_frozen():
    def mid(b, y):
        return b.op("GroupNormalization", [y, b.weight("gn.scale", (8,), positive=True),
                                           b.weight("gn.bias", (8,), 0.1)], name="gn", num_groups=2), 8

    m = frozen_middle(mid, opset=21)  # opset-18 GroupNormalization is deprecated (onnx.checker rejects it)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "GroupNormalization 'gn'"), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c0", 1): (3, 3, 3, 3), ("c1", 1): (8, 3, 3, 3), ("gn", 1): (8,)})


# ---- element-wise -------------------------------------------------------------------------------------------------
def _unary(b, y, op):
    if op == "LeakyRelu":
        return b.op("LeakyRelu", [y], alpha=0.1)
    if op == "Clip":
        return b.op("Clip", [y, b.const("lo", np.array(0.0, np.float32)), b.const("hi", np.array(6.0, np.float32))])
    if op == "ErfGelu":  # the decomposed GELU exporters emit: 0.5 * x * (1 + erf(x / sqrt(2)))
        e = b.op("Erf", [b.op("Div", [y, b.const("sqrt2", np.array(np.sqrt(2), np.float32))])])
        e = b.op("Add", [e, b.const("one", np.array(1.0, np.float32))])
        return b.op("Mul", [b.op("Mul", [y, e]), b.const("half", np.array(0.5, np.float32))])
    return b.op(op, [y])


@pytest.mark.parametrize("op", ["Relu", "LeakyRelu", "Sigmoid", "HardSwish", "Clip", "Gelu", "Erf", "ErfGelu",
                                "Tanh"])
def test_unary(op):
    b = Builder(20 if op == "Gelu" else 17)  # Gelu is an opset-20 op
    x = b.input("x", [1, 3, 8, 8])
    y = _unary(b, b.conv("c1", x, 3, 8), op)
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3)})


def test_prelu_per_channel_slope():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("PRelu", [b.conv("c1", x, 3, 8), b.weight("slope", (8, 1, 1), 0.2)], name="prelu")
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("prelu", 1): (4, 1, 1), ("c2", 1): (4, 4, 3, 3)})


def test_residual_add_couples_two_convs():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv("c1", x, 3, 8))
    r = b.bn("bn", b.conv("c2", a, 8, 8), 8)
    y = b.relu(b.op("Add", [a, r], name="add"))
    b.output(b.conv("c3", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c3": (4, 4, OUT)})
    assert group_of(analysis, "c1").sources == ["c1", "c2"]
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3), ("bn", 1): (4,),
                               ("c3", 1): (4, 4, 3, 3)})


def test_residual_dead_channels_match_original():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv("c1", x, 3, 8))
    r = b.bn("bn", b.conv("c2", a, 8, 8), 8)
    y = b.relu(b.op("Add", [a, r], name="add"))
    b.output(b.conv("c3", y, 8, 4))
    dead = [0, 3, 4, 6]
    m = zeroed(b.model(), {"c1.weight": (0, dead), "c1.bias": (0, dead), "c2.weight": [(0, dead), (1, dead)],
                           "c2.bias": (0, dead), "bn.scale": (0, dead), "bn.bias": (0, dead), "bn.mean": (0, dead),
                           "bn.var": (0, dead), "c3.weight": (1, dead)})
    res = prune_and_check(m, 0.5, equal_original=True)
    np.testing.assert_array_equal(param_value(res.pruned, "c1", 1), param_value(m, "c1", 1)[[1, 2, 5, 7]])


def test_se_gate():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    s = b.relu(b.conv("c1", x, 3, 8))
    g = b.op("GlobalAveragePool", [s])
    g = b.relu(b.conv("se1", g, 8, 2, k=1))
    g = b.op("Sigmoid", [b.conv("se2", g, 2, 8, k=1)])
    y = b.op("Mul", [s, g], name="gate")
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "se1": (2, 0, None), "c2": (4, 4, OUT)})
    assert group_of(analysis, "c1").sources == ["c1", "se2"]
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("se1", 1): (1, 4, 1, 1), ("se1", 2): (1,),
                               ("se2", 1): (4, 1, 1, 1), ("se2", 2): (4,), ("c2", 1): (4, 4, 3, 3)})


def test_per_channel_constant_mul_add():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Mul", [b.conv("c1", x, 3, 8), b.weight("scale", (1, 8, 1, 1), positive=True)], name="mul")
    y = b.op("Add", [y, b.weight("shift", (8, 1, 1), 0.1)], name="add")
    y = b.op("Sub", [b.const("zero", np.zeros((1, 1, 1), np.float32)), y], name="sub")  # broadcast scalar-like
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("mul", 1): (1, 4, 1, 1), ("add", 1): (4, 1, 1), ("sub", 0): (1, 1, 1),
                               ("c2", 1): (4, 4, 3, 3)})


def test_broadcast_const_first_operand_div_where():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Sub", [b.weight("k", (8, 1, 1)), b.conv("c1", x, 3, 8)], name="sub")
    y = b.op("Div", [y, b.weight("d", (1, 8, 1, 1), positive=True)], name="div")
    cond = b.const("cond", np.arange(8).reshape(8, 1, 1) % 3 == 0)
    y = b.op("Where", [cond, y, b.weight("alt", (1, 8, 1, 1))], name="where")
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    dead = [0, 1, 5, 6]
    # d (a divisor) stays non-zero; the dead units still score lowest
    m = zeroed(m, {"c1.weight": (0, dead), "c1.bias": (0, dead), "k": (0, dead), "alt": (1, dead),
                   "c2.weight": (1, dead)})
    res = prune_and_check(m, 0.5, equal_original=True)
    assert_shapes(res.pruned, {("sub", 0): (4, 1, 1), ("div", 1): (1, 4, 1, 1), ("where", 0): (4, 1, 1),
                               ("where", 2): (1, 4, 1, 1), ("c2", 1): (4, 4, 3, 3)})


def test_shared_per_channel_constant_cut_per_use():
    """One scale tensor multiplies two independent groups that lose different channels: each use gets its own
    cut copy; the shared initializer is never edited in place."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    s = b.weight("scale", (1, 8, 1, 1), positive=True)
    a = b.op("Mul", [b.relu(b.conv("c1", x, 3, 8)), s], name="m1")
    c = b.op("Mul", [b.relu(b.conv("c2", x, 3, 8)), s], name="m2")
    b.output(b.op("Add", [b.conv("o1", a, 8, 4), b.conv("o2", c, 8, 4)]))
    d1, d2 = [0, 1, 2, 3], [4, 5, 6, 7]
    m = zeroed(b.model(), {"c1.weight": (0, d1), "c1.bias": (0, d1), "o1.weight": (1, d1),
                           "c2.weight": (0, d2), "c2.bias": (0, d2), "o2.weight": (1, d2)})
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (8, 0, None), "o1": (4, 4, OUT)})
    res = prune_and_check(m, 0.5, equal_original=True)
    scale = param_value(m, "m1", 1).reshape(-1)
    np.testing.assert_array_equal(param_value(res.pruned, "m1", 1).reshape(-1), scale[4:])
    np.testing.assert_array_equal(param_value(res.pruned, "m2", 1).reshape(-1), scale[:4])


def test_add_runtime_unlabelled_tensor_frozen():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    z = b.input("z", [1, 8, 8, 8])
    y = b.relu(b.conv("c0", x, 3, 6))
    y = b.op("Add", [b.conv("c1", y, 6, 8), z], name="add_z")
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "Add 'add_z'"), "c2": (4, 4, OUT)})
    assert "'z'" in reasons_text(group_of(analysis, "c1"))
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c0", 1): (3, 3, 3, 3), ("c1", 1): (8, 3, 3, 3), ("c2", 1): (4, 8, 3, 3)})


# ---- pooling, reductions, softmax, resize, pad ---------------------------------------------------------------------
@pytest.mark.parametrize("op,attrs,hw", [
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2]), 4),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), 8),
    ("GlobalAveragePool", {}, 1),
    ("GlobalMaxPool", {}, 1),
])
def test_pooling(op, attrs, hw):
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op(op, [b.relu(b.conv("c1", x, 3, 8))], name="pool", **attrs)
    b.output(b.conv("c2", y, 8, 4, k=1))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 1, 1)})
    assert res.report["macs"]["after"] == 4 * 3 * 9 * 64 + 4 * 4 * hw * hw


def maxpool_indices_model(consumed: bool):
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c0", x, 3, 6))
    vals, idx = b.op("MaxPool", [b.conv("c1", y, 6, 8)], name="mp", n_out=2, kernel_shape=[2, 2], strides=[2, 2])
    b.output(b.conv("c2", vals, 8, 4))
    if consumed:
        b.output(b.op("Cast", [idx], to=TensorProto.FLOAT))
    else:
        b.output(idx, TensorProto.INT64)
    return b.model()


def test_maxpool_with_used_indices_frozen():
    m = maxpool_indices_model(consumed=True)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "MaxPool 'mp'"), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c0", 1): (3, 3, 3, 3), ("c1", 1): (8, 3, 3, 3)})


def test_maxpool_indices_graph_output_frozen():
    m = maxpool_indices_model(consumed=False)
    _, analysis = analyse(m)
    assert int(group_of(analysis, "c1").frozen.sum()) == 8
    prune_and_check(m, 0.5)


@pytest.mark.parametrize("keepdims", [1, 0])
def test_reduce_mean_spatial(keepdims):
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("ReduceMean", [b.relu(b.conv("c1", x, 3, 8))], name="rm", axes=[2, 3], keepdims=keepdims)
    if keepdims:
        b.output(b.conv("c2", y, 8, 4, k=1))
        wshape = (4, 4, 1, 1)
    else:
        b.output(b.gemm("c2", y, 8, 4, trans_b=1))
        wshape = (4, 4)
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): wshape})


def test_reduce_mean_opset18_axes_input():
    b = Builder(18)
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("ReduceMean", [b.relu(b.conv("c1", x, 3, 8)), b.i64("axes", [-1, -2])], name="rm", keepdims=0)
    b.output(b.gemm("c2", y, 8, 4, trans_b=1))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4)})


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax"])
def test_reduce_over_channels_frozen(op):
    def mid(b, y):
        if op == "ReduceSum":  # axes is an input from opset 13
            return b.op(op, [y, b.i64("axes", [-3])], name="red", keepdims=1), 1
        return b.op(op, [y], name="red", axes=[1], keepdims=1), 1

    m = frozen_middle(mid)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, f"{op} 'red'"), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c0", 1): (3, 3, 3, 3), ("c1", 1): (8, 3, 3, 3)})


def test_softmax_over_channels_frozen():
    def mid(b, y):
        return b.op("Softmax", [y], name="sm", axis=1), 8

    m = frozen_middle(mid)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "Softmax 'sm'"), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c0", 1): (3, 3, 3, 3), ("c1", 1): (8, 3, 3, 3), ("c2", 1): (4, 8, 3, 3)})


@pytest.mark.parametrize("axis", [-1, 2])
def test_softmax_over_other_axis(axis):
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Softmax", [b.conv("c1", x, 3, 8)], name="sm", axis=axis)
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3)})


def test_resize_scales():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
    y = b.op("Resize", [b.relu(b.conv("c1", x, 3, 8)), "", scales], name="up", mode="nearest")
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3)})
    np.testing.assert_array_equal(param_value(res.pruned, "up", 2), [1, 1, 2, 2])


def test_resize_sizes_rewritten():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    sizes = b.i64("sizes", [1, 8, 16, 16])
    y = b.op("Resize", [b.relu(b.conv("c1", x, 3, 8)), "", "", sizes], name="up", mode="linear")
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3)})
    np.testing.assert_array_equal(param_value(res.pruned, "up", 3), [1, 4, 16, 16])


def test_resize_scaling_channels_frozen():
    def mid(b, y):
        s = b.const("scales", np.array([1, 2, 1, 1], np.float32))
        return b.op("Resize", [y, "", s], name="up", mode="nearest"), 16

    m = frozen_middle(mid)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "Resize 'up'"), "c2": (4, 4, OUT)})


def test_pad_spatial():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    pads = b.i64("pads", [0, 0, 1, 1, 0, 0, 1, 1])
    y = b.op("Pad", [b.relu(b.conv("c1", x, 3, 8)), pads], name="pad", mode="reflect")
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3)})


def test_pad_channel_axis_frozen():
    def mid(b, y):
        return b.op("Pad", [y, b.i64("pads", [0, 1, 0, 0, 0, 1, 0, 0])], name="pad"), 10

    m = frozen_middle(mid)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "Pad 'pad'"), "c2": (4, 4, OUT)})


def test_identity_dropout_cast():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Identity", [b.conv("c1", x, 3, 8)])
    y = b.op("Dropout", [y], name="drop")
    y = b.op("Cast", [y], to=TensorProto.FLOAT)
    b.output(b.conv("c2", b.relu(y), 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3)})


# ---- Concat, Split, Slice, Gather ----------------------------------------------------------------------------------
def concat_model():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv("ca", x, 3, 4))
    c = b.relu(b.conv("cb", x, 3, 6))
    y = b.op("Concat", [a, c], name="cat", axis=1)
    b.output(b.conv("c3", y, 10, 4))
    return b.model()


def test_concat_channel_axis_one_group():
    m = concat_model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"ca": (10, 0, None), "c3": (4, 4, OUT)})
    assert group_of(analysis, "ca").sources == ["ca", "cb"]
    res = prune_and_check(m, 0.5)
    kept_a, kept_b = param_shapes(res.pruned)[("ca", 1)][0], param_shapes(res.pruned)[("cb", 1)][0]
    assert kept_a + kept_b == 5 and kept_a >= 1 and kept_b >= 1
    assert_shapes(res.pruned, {("c3", 1): (4, 5, 3, 3)})


def test_concat_dead_channels_offsets():
    """Dead channels on both sides of the Concat: the consumer's columns must be cut at the right offsets."""
    dead_a, dead_b = [1, 3], [0, 2, 5]
    m = zeroed(concat_model(), {"ca.weight": (0, dead_a), "ca.bias": (0, dead_a), "cb.weight": (0, dead_b),
                                "cb.bias": (0, dead_b), "c3.weight": (1, dead_a + [4 + i for i in dead_b])})
    res = prune_and_check(m, 0.5, equal_original=True)
    assert_shapes(res.pruned, {("ca", 1): (2, 3, 3, 3), ("cb", 1): (3, 3, 3, 3), ("c3", 1): (4, 5, 3, 3)})
    kept = [0, 2, 4 + 1, 4 + 3, 4 + 4]
    np.testing.assert_array_equal(param_value(res.pruned, "c3", 1), param_value(m, "c3", 1)[:, kept])


def test_concat_with_graph_input():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv("c1", x, 3, 8))
    y = b.op("Concat", [x, a], name="cat", axis=1)
    b.output(b.conv("c2", y, 11, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    dead = [0, 2, 3, 7]
    m = zeroed(m, {"c1.weight": (0, dead), "c1.bias": (0, dead), "c2.weight": (1, [3 + i for i in dead])})
    res = prune_and_check(m, 0.5, equal_original=True)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 3 + 4, 3, 3)})
    np.testing.assert_array_equal(param_value(res.pruned, "c2", 1), param_value(m, "c2", 1)[:, [0, 1, 2, 4, 7, 8, 9]])


def test_concat_on_spatial_axis_unifies():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv("ca", x, 3, 8))
    c = b.relu(b.conv("cb", x, 3, 8))
    y = b.op("Concat", [a, c], name="cat", axis=2)
    b.output(b.conv("c3", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"ca": (8, 0, None), "c3": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("ca", 1): (4, 3, 3, 3), ("cb", 1): (4, 3, 3, 3), ("c3", 1): (4, 4, 3, 3)})


def split_model(opset=17):
    b = Builder(opset)
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    if opset >= 18:
        p, q = b.op("Split", [y], name="split", n_out=2, axis=1, num_outputs=2)
        na, nb = 4, 4
    else:
        p, q = b.op("Split", [y, b.i64("split_sizes", [3, 5])], name="split", n_out=2, axis=1)
        na, nb = 3, 5
    r = b.op("Add", [b.conv("ca", p, na, 4), b.conv("cb", q, nb, 4)], name="add")
    b.output(r)
    return b.model(), na


@pytest.mark.parametrize("opset", [17, 18])
def test_split_sizes_rewritten(opset):
    m, na = split_model(opset)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "ca": (4, 4, OUT)})
    assert group_of(analysis, "ca").sources == ["ca", "cb"]
    dead = [0, 4, 5, 7]  # one from the first piece (3 with opset 17 / 4 with 18), the rest from the second
    m = zeroed(m, {"c1.weight": (0, dead), "c1.bias": (0, dead), "ca.weight": (1, [d for d in dead if d < na]),
                   "cb.weight": (1, [d - na for d in dead if d >= na])})
    res = prune_and_check(m, 0.5, equal_original=True)
    n_a = na - sum(d < na for d in dead)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("ca", 1): (4, n_a, 3, 3), ("cb", 1): (4, 4 - n_a, 3, 3)})
    split = next(n for n in res.pruned.graph.node if n.name == "split")
    sizes = param_value(res.pruned, "split", 1)
    assert list(sizes) == [n_a, 4 - n_a]
    assert not any(a.name == "num_outputs" for a in split.attribute) or opset < 18


@pytest.mark.parametrize("op", ["Split", "Concat"])
def test_piece_never_emptied(op):
    """A one-channel Split piece / Concat operand whose channel scores lowest is given back, not emptied."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    if op == "Split":
        y = b.relu(b.conv("c1", x, 3, 8))
        p, q = b.op("Split", [y, b.i64("split_sizes", [1, 7])], name="split", n_out=2, axis=1)
        b.output(b.op("Add", [b.conv("ca", p, 1, 4), b.conv("cb", q, 7, 4)]))
        m = zeroed(b.model(), {"c1.weight": (0, [0]), "c1.bias": (0, [0]), "ca.weight": (1, [0])})
    else:
        a, c = b.relu(b.conv("ca", x, 3, 1)), b.relu(b.conv("cb", x, 3, 7))
        b.output(b.conv("c3", b.op("Concat", [a, c], axis=1), 8, 4))
        m = zeroed(b.model(), {"ca.weight": (0, [0]), "ca.bias": (0, [0]), "c3.weight": (1, [0])})
    res = prune_and_check(m, 0.5)
    if op == "Split":
        sizes = list(param_value(res.pruned, "split", 1))
        assert sizes[0] == 1 and sum(sizes) in (4, 5)
    else:
        assert param_shapes(res.pruned)[("ca", 1)] == (1, 3, 3, 3)
        assert param_shapes(res.pruned)[("c3", 1)][1] in (4, 5)


def test_split_opset11_attribute_rewritten():
    b = Builder(11)
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    p, q = b.op("Split", [y], name="split", n_out=2, axis=1, split=[3, 5])
    b.output(b.op("Add", [b.conv("ca", p, 3, 4), b.conv("cb", q, 5, 4)]))
    dead = [1, 2, 3, 6]
    m = zeroed(b.model(), {"c1.weight": (0, dead), "c1.bias": (0, dead), "ca.weight": (1, [1, 2]),
                           "cb.weight": (1, [0, 3])})
    res = prune_and_check(m, 0.5, equal_original=True)
    assert list(node_attr(res.pruned, "split", "split")) == [1, 3]
    assert_shapes(res.pruned, {("ca", 1): (4, 1, 3, 3), ("cb", 1): (4, 3, 3, 3)})


def test_slice_channel_axis_bounds_rewritten():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.op("Slice", [y, b.i64("starts", [2]), b.i64("ends", [7]), b.i64("axes", [1])], name="sl")
    b.output(b.conv("c2", y, 5, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    dead = [0, 3, 5, 7]
    m = zeroed(m, {"c1.weight": (0, dead), "c1.bias": (0, dead), "c2.weight": (1, [1, 3])})
    res = prune_and_check(m, 0.5, equal_original=True)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 3, 3, 3)})
    assert list(param_value(res.pruned, "sl", 1)) == [1]
    assert list(param_value(res.pruned, "sl", 2)) == [4]


def test_slice_strided_channel_axis_frozen():
    def mid(b, y):
        return b.op("Slice", [y, b.i64("starts", [0]), b.i64("ends", [8]), b.i64("axes", [1]),
                              b.i64("steps", [2])], name="sl"), 4

    m = frozen_middle(mid)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "Slice 'sl'"), "c2": (4, 4, OUT)})


def test_slice_negative_start_and_open_end():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.op("Slice", [y, b.i64("starts", [1, -5]), b.i64("ends", [7, 2 ** 63 - 1]), b.i64("axes", [2, 1])],
             name="sl")
    b.output(b.conv("c2", y, 5, 4))
    dead = [0, 3, 4, 6]  # channels 3..7 reach c2 at positions 0..4
    m = zeroed(b.model(), {"c1.weight": (0, dead), "c1.bias": (0, dead), "c2.weight": (1, [0, 1, 3])})
    res = prune_and_check(m, 0.5, equal_original=True)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 2, 3, 3)})
    starts, ends = list(param_value(res.pruned, "sl", 1)), list(param_value(res.pruned, "sl", 2))
    assert starts[0] == 1 and ends[0] == 7  # the spatial axis is untouched
    assert (starts[1], ends[1]) == (2, 4)   # kept 1, 2, 5, 7: the slice covers 5 and 7


def test_gather_channel_indices_remapped():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.op("Gather", [y, b.i64("idx", [6, 0, 3, 3, 5])], name="ga", axis=1)
    b.output(b.conv("c2", y, 5, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    dead = [0, 2, 5, 7]
    m = zeroed(m, {"c1.weight": (0, dead), "c1.bias": (0, dead), "c2.weight": (1, [1, 4])})
    res = prune_and_check(m, 0.5, equal_original=True)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 3, 3, 3)})
    # kept channels 1, 3, 4, 6 -> new positions 0, 1, 2, 3; indices [6, 3, 3] -> [3, 1, 1]
    assert list(param_value(res.pruned, "ga", 1)) == [3, 1, 1]


def test_gather_int32_negative_indices():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.op("Gather", [y, b.const("idx", np.array([7, 1, -2], np.int32))], name="ga", axis=1)
    b.output(b.conv("c2", y, 3, 4))
    dead = [0, 1, 3, 4]  # kept 2, 5, 6, 7 -> 7 -> 3, 6 -> 2; position 1 (channel 1) goes
    m = zeroed(b.model(), {"c1.weight": (0, dead), "c1.bias": (0, dead), "c2.weight": (1, [1])})
    res = prune_and_check(m, 0.5, equal_original=True)
    idx = param_value(res.pruned, "ga", 1)
    assert idx.dtype == np.int32 and list(idx) == [3, 2]
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 2, 3, 3)})


def test_gather_scalar_channel_frozen():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c0", x, 3, 6))
    y = b.op("Gather", [b.conv("c1", y, 6, 8), b.const("i", np.array(2, np.int64))], name="ga", axis=1)
    b.output(b.op("Relu", [y]))
    m = b.model()
    _, analysis = analyse(m)
    g = group_of(analysis, "c1")
    assert g.size == 8 and int(g.frozen.sum()) >= 1 and "Gather 'ga'" in reasons_text(g)


# ---- layout: Flatten, Reshape, Transpose, Squeeze/Unsqueeze, Expand ------------------------------------------------
def head_model(kind: str, target=None):
    """x -> c1 (3->6) -> relu -> MaxPool -> (1, 6, 2, 2) -> Flatten/Reshape -> (1, 24) -> fc1 (->5) -> relu -> fc2."""
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    y = b.op("MaxPool", [b.relu(b.conv("c1", x, 3, 6))], kernel_shape=[2, 2], strides=[2, 2])
    if kind == "flatten":
        y = b.op("Flatten", [y], name="flat", axis=1)
        y = b.relu(b.gemm("fc1", y, 24, 5))
        b.output(b.gemm("fc2", y, 5, 3))
    else:
        y = b.op("Reshape", [y, b.i64("target", target)], name="rs")
        y = b.relu(b.linear("fc1", y, 24, 5))
        b.output(b.linear("fc2", y, 5, 3))
    return b.model()


def dead_head(m, bias_node="fc1"):
    dead_c, dead_f = [1, 2, 4], [0, 2, 3]
    rows = [4 * c + i for c in dead_c for i in range(4)]  # each channel is a block of H*W = 4 rows
    return zeroed(m, {"c1.weight": (0, dead_c), "c1.bias": (0, dead_c), "fc1.weight": [(0, rows), (1, dead_f)],
                      "fc1.bias": (0, dead_f), "fc2.weight": (0, dead_f)})


def test_flatten_gemm_blocks():
    m = head_model("flatten")
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (6, 0, None), "fc1": (5, 0, None), "fc2": (3, 3, OUT)})
    res = prune_and_check(dead_head(m), 0.5, equal_original=True)
    assert_shapes(res.pruned, {("c1", 1): (3, 3, 3, 3), ("fc1", 1): (12, 2), ("fc1", 2): (2,), ("fc2", 1): (2, 3)})
    rows = [4 * c + i for c in (0, 3, 5) for i in range(4)]
    np.testing.assert_array_equal(param_value(res.pruned, "fc1", 1), param_value(dead_head(m), "fc1", 1)[rows][:, [1, 4]])


@pytest.mark.parametrize("pool", [False, True])
def test_flatten_of_one_channel(pool):
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    y = b.relu(b.conv("c0", x, 3, 6))
    y = b.relu(b.conv("c1", y, 6, 1))
    if pool:
        y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], name="flat", axis=1)
    b.output(b.gemm("fc", y, 1 if pool else 16, 3))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (1, 1, "single-channel axis"), "fc": (3, 3, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c0", 1): (3, 3, 3, 3), ("c1", 1): (1, 3, 3, 3)})


@pytest.mark.parametrize("target,new", [([1, 24], [1, 12]), ([1, -1], [1, -1]), ([0, -1], [0, -1])])
def test_reshape_matmul_blocks(target, new):
    m = head_model("reshape", target)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (6, 0, None), "fc1": (5, 0, None), "fc2": (3, 3, OUT)})
    res = prune_and_check(dead_head(m), 0.5, equal_original=True)
    assert_shapes(res.pruned, {("c1", 1): (3, 3, 3, 3), ("fc1", 1): (12, 2), ("fc1_bias", 1): (2,),
                               ("fc2", 1): (2, 3), ("fc2_bias", 1): (3,)})
    assert list(param_value(res.pruned, "rs", 1)) == new


def test_transpose_to_channels_last_and_back():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Transpose", [b.relu(b.conv("c1", x, 3, 8))], perm=[0, 2, 3, 1])
    y = b.op("Transpose", [b.relu(b.matmul("mm", y, 8, 5))], perm=[0, 3, 1, 2])
    b.output(b.conv("c2", y, 5, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "mm": (5, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("mm", 1): (4, 2), ("c2", 1): (4, 2, 3, 3)})


def test_squeeze_unsqueeze():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("GlobalAveragePool", [b.relu(b.conv("c1", x, 3, 8))])
    y = b.op("Squeeze", [y, b.i64("sq_axes", [2, 3])], name="sq")
    y = b.relu(b.gemm("fc", y, 8, 6, trans_b=1))
    y = b.op("Unsqueeze", [y, b.i64("unsq_axes", [2, 3])], name="unsq")
    b.output(b.conv("c2", y, 6, 4, k=1))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "fc": (6, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("fc", 1): (3, 4), ("fc", 2): (3,), ("c2", 1): (4, 3, 1, 1)})


def test_squeeze_channel_axis_frozen():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c0", x, 3, 6))
    y = b.op("Squeeze", [b.conv("c1", y, 6, 1), b.i64("axes", [1])], name="sq")
    b.output(b.op("Unsqueeze", [y, b.i64("axes1", [1])]))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (1, 1, "Squeeze 'sq'")})


@pytest.mark.parametrize("target,new", [([1, 8, 8, 8], [1, 4, 8, 8]), ([1, 1, 8, 8], [1, 1, 8, 8])])
def test_expand(target, new):
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    s = b.relu(b.conv("c1", x, 3, 8))
    g = b.op("Expand", [b.op("GlobalAveragePool", [s]), b.i64("target", target)], name="ex")
    y = b.op("Mul", [s, g])
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3)})
    assert list(param_value(res.pruned, "ex", 1)) == new


def test_tile_spatial():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Tile", [b.relu(b.conv("c1", x, 3, 8)), b.i64("reps", [1, 1, 2, 2])], name="tile")
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3), ("tile", 1): (4,)})


def test_tile_channel_axis_frozen():
    def mid(b, y):
        return b.op("Tile", [y, b.i64("reps", [1, 2, 1, 1])], name="tile"), 16

    m = frozen_middle(mid)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "Tile 'tile'"), "c2": (4, 4, OUT)})


def shared_runtime_shape_model():
    """Two branches reshape (N, C, H, W) -> (N, 128) with ONE run-time shape tensor Concat(Shape(x)[0], [128])
    (dynamic batch, as exporters emit it); the branches are independent groups (8x4x4 and 32x2x2 channels)."""
    b = Builder()
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]))
    a = b.relu(b.conv("c1", "x", 3, 8))
    c = b.relu(b.conv("c2", "x", 3, 32, stride=2))
    n = b.op("Gather", [b.op("Shape", ["x"]), b.i64("zero", [0])], axis=0)
    target = b.op("Concat", [n, b.i64("flat", [128])], name="shape_cat", axis=0)
    ya = b.matmul("wa", b.op("Reshape", [a, target], name="rs_a"), 128, 5)
    yc = b.matmul("wc", b.op("Reshape", [c, target], name="rs_c"), 128, 5)
    y = b.op("Add", [ya, yc])
    out = helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 5])
    return make_model(b.nodes, b.inits, b.inputs, [out])


def test_shared_runtime_reshape_shape_same_width():
    m = shared_runtime_shape_model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (32, 0, None), "wa": (5, 5, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (16, 3, 3, 3), ("wa", 1): (64, 5),
                               ("wc", 1): (64, 5)})


def test_shared_runtime_reshape_shape_different_widths():
    m = shared_runtime_shape_model()
    res = prune_and_check(m, 0.5, exclude=["c2"])
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (32, 3, 3, 3), ("wa", 1): (64, 5),
                               ("wc", 1): (128, 5)})


def runtime_flatten_model(style: str, opset: int = 17):
    """Flatten with a dynamic batch as non-torch exporters emit it: Reshape(y, Concat(batch read by Shape(y),
    [C*H*W])). 'tf2onnx': Shape(y) -> Gather([0,2,3,1]) (NHWC order) -> Cast(int32) -> Slice[0:1] -> Concat in
    int32 -> Cast(int64), reshaping the NHWC Transpose of y; 'paddle': Shape(y) -> Slice[0:1] -> Concat;
    'channel': the target also takes C from Shape(y) at run time (Slice[0:2] -> (N, C, -1)), then a mean over
    the last axis and a MatMul on the channels."""
    b = Builder(opset=opset)
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]))
    y = b.relu(b.conv("c1", "x", 3, 8))
    shape = b.op("Shape", [y], name="shape")
    if style == "tf2onnx":
        s = b.op("Cast", [b.op("Gather", [shape, b.i64("nhwc", [0, 2, 3, 1])], axis=0)], to=TensorProto.INT32)
        s = b.op("Slice", [s, b.i64("s0", [0]), b.i64("s1", [1]), b.i64("ax", [0])])
        flat = b.const("flat", np.array([128], dtype=np.int32))
        target = b.op("Cast", [b.op("Concat", [s, flat], axis=0)], to=TensorProto.INT64)
        y = b.op("Transpose", [y], perm=[0, 2, 3, 1])
        w = 128
    elif style == "paddle":
        s = b.op("Slice", [shape, b.i64("s0", [0]), b.i64("s1", [1]), b.i64("ax", [0])])
        target = b.op("Concat", [s, b.i64("flat", [128])], axis=0)
        w = 128
    else:
        s = b.op("Slice", [shape, b.i64("s0", [0]), b.i64("s1", [2]), b.i64("ax", [0])])
        target = b.op("Concat", [s, b.i64("rest", [-1])], axis=0)
        y = b.op("ReduceMean", [b.op("Reshape", [y, target], name="flatten")], axes=[-1], keepdims=0)
        y = b.matmul("fc", y, 8, 5)
        return make_model(b.nodes, b.inits, b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
                          opset=opset)
    y = b.matmul("fc", b.op("Reshape", [y, target], name="flatten"), w, 5)
    return make_model(b.nodes, b.inits, b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
                      opset=opset)


@pytest.mark.parametrize("style", ["tf2onnx", "paddle"])
def test_runtime_batch_flatten_prunes(style):
    """Normalize splits Shape(y) into Concat(Shape(y, 0, 1), [8, 4, 4]) (static dims as constants), so only the
    batch is read at run time, and the Reshape target's C*H*W (behind an int32 Concat and a Cast for tf2onnx) is
    rewritten."""
    m = runtime_flatten_model(style)
    model, analysis = analyse(m)
    assert model.normalize_report["shape_reads_split"] == 1
    assert_groups(analysis, {"c1": (8, 0, None), "fc": (5, 5, OUT)})
    res = prune_and_check(m, 0.5)  # verification also runs batch 2
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("fc", 1): (64, 5)})
    target = [n for n in res.pruned.graph.node if n.op_type == "Concat" and n.name != "shape_split"]
    assert len(target) == 1 and param_value(res.pruned, target[0].name, 1).tolist() == [64]
    assert [(node_attr(res.pruned, n.name, "start"), node_attr(res.pruned, n.name, "end"))
            for n in res.pruned.graph.node if n.op_type == "Shape"] == [(0, 1)]


def test_runtime_channel_read_is_the_current_count():
    """A target taking C from Shape(y) at run time, on the axis that carries y's channels, reads the pruned count
    after pruning: nothing to freeze and nothing to rewrite (the opset-14 whole-shape read the same way)."""
    for opset in (17, 14):
        m = runtime_flatten_model("channel", opset=opset)
        _, analysis = analyse(m)
        assert_groups(analysis, {"c1": (8, 0, None), "fc": (5, 5, OUT)})
        res = prune_and_check(m, 0.5)
        assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("fc", 1): (4, 5)})


def test_runtime_batch_flatten_before_opset_15_prunes():
    """Shape has no start/end before opset 15, so Normalize cannot split the read; the whole-shape read still only
    feeds the batch into the target, and the channel count it also reads is used nowhere: the group prunes."""
    m = runtime_flatten_model("paddle", opset=14)
    model, analysis = analyse(m)
    assert model.normalize_report["shape_reads_split"] == 0
    assert_groups(analysis, {"c1": (8, 0, None), "fc": (5, 5, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("fc", 1): (64, 5)})


# ---- Gemm / MatMul --------------------------------------------------------------------------------------------------
def test_gemm_trans_b():
    b = Builder()
    x = b.input("x", [2, 16])
    y = b.relu(b.gemm("g1", x, 16, 8, trans_b=1))
    b.output(b.gemm("g2", y, 8, 4, trans_b=1))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"g1": (8, 0, None), "g2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("g1", 1): (4, 16), ("g1", 2): (4,), ("g2", 1): (4, 4), ("g2", 2): (4,)})
    assert res.report["macs"]["before"] == 2 * 8 * 16 + 2 * 4 * 8
    assert res.report["macs"]["after"] == 2 * 4 * 16 + 2 * 4 * 4


def test_gemm_trans_b_dead_units():
    b = Builder()
    x = b.input("x", [2, 16])
    y = b.relu(b.gemm("g1", x, 16, 8, trans_b=1))
    b.output(b.gemm("g2", y, 8, 4, trans_b=1))
    dead = [1, 2, 5, 6]
    m = zeroed(b.model(), {"g1.weight": (0, dead), "g1.bias": (0, dead), "g2.weight": (1, dead)})
    res = prune_and_check(m, 0.5, equal_original=True)
    np.testing.assert_array_equal(param_value(res.pruned, "g1", 1), param_value(m, "g1", 1)[[0, 3, 4, 7]])


def test_matmul_add_linear():
    b = Builder()
    x = b.input("x", [1, 5, 16])
    y = b.relu(b.linear("l1", x, 16, 8))
    b.output(b.linear("l2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"l1": (8, 0, None), "l2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("l1", 1): (16, 4), ("l1_bias", 1): (4,), ("l2", 1): (4, 4), ("l2_bias", 1): (4,)})


def test_gemm_trans_a_contracts_the_labelled_axis():
    b = Builder()
    x = b.input("x", [2, 16])
    y = b.op("Transpose", [b.relu(b.gemm("g1", x, 16, 8))], perm=[1, 0])  # (8, 2)
    b.output(b.op("Gemm", [y, b.weight("g2.weight", (8, 4))], name="g2", transA=1))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"g1": (8, 0, None), "g2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("g1", 1): (16, 4), ("g1", 2): (4,), ("g2", 1): (4, 4)})


def test_gemm_bias_row_vector():
    b = Builder()
    x = b.input("x", [2, 16])
    y = b.relu(b.op("Gemm", [x, b.weight("g1.weight", (16, 8)), b.weight("g1.bias", (1, 8), 0.1)], name="g1"))
    b.output(b.gemm("g2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"g1": (8, 0, None), "g2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("g1", 1): (16, 4), ("g1", 2): (1, 4), ("g2", 1): (4, 4)})


def test_matmul_weight_on_the_left():
    """W(6, 8) . x(1, 8, L): channels on axis -2 (a Conv1d-like layout); W's rows are a new source."""
    b = Builder()
    x = b.input("x", [1, 3, 16])
    y = b.relu(b.conv("c1", x, 3, 8, dims=1))
    y = b.relu(b.op("MatMul", [b.weight("wl", (6, 8)), y], name="wl_mm"))
    b.output(b.conv("c2", y, 6, 4, dims=1))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "wl_mm": (6, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3), ("wl_mm", 0): (3, 4), ("c2", 1): (4, 3, 3)})


def test_weight_tied_convs():
    """One initializer is the weight of two convs in series: each use is cut by its own labellings."""
    b = Builder()
    x = b.input("x", [1, 8, 8, 8])
    y = b.relu(b.conv("c0", x, 8, 8))
    y = b.op("Conv", [y, "c0.weight", "c0.bias"], name="tied", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.output(b.conv("c2", b.relu(y), 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (8, 0, None), "tied": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c0", 1): (4, 8, 3, 3), ("tied", 1): (4, 4, 3, 3), ("c2", 1): (4, 4, 3, 3)})


def test_constant_node_weight():
    """Weights given as Constant nodes (Paddle exporters) are lifted to initializers and pruned."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    b.nodes.append(helper.make_node("Constant", [], ["w1"], value=onnx.numpy_helper.from_array(
        np.asarray(np.random.default_rng(0).standard_normal((8, 3, 3, 3)), np.float32))))
    y = b.relu(b.op("Conv", [x, "w1"], name="c1", kernel_shape=[3, 3]))
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c1": (8, 0, None), "c2": (4, 4, OUT)})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3)})


def test_single_head_attention_contraction():
    """Q.K^T contracts the labelled feature axis: Q and K columns form one group (disconnected in the reference
    by a mask), V and the output projection another."""
    b = Builder()
    T, D = 5, 8
    x = b.input("x", [1, T, D])
    q, k, v = b.matmul("wq", x, D, D), b.matmul("wk", x, D, D), b.matmul("wv", x, D, D)
    s = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])], name="qk")
    p = b.op("Softmax", [b.op("Mul", [s, b.const("scale", np.array(D ** -0.5, np.float32))])], axis=-1)
    o = b.op("MatMul", [p, v], name="pv")
    b.output(b.matmul("wo", o, D, D))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"wq": (8, 0, None), "wv": (8, 0, None), "wo": (8, 8, OUT)})
    assert group_of(analysis, "wq").sources == ["wq", "wk"]
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("wq", 1): (8, 4), ("wk", 1): (8, 4), ("wv", 1): (8, 4), ("wo", 1): (4, 8)})
    assert res.report["macs"]["after"] == 3 * T * D * 4 + T * T * 4 + T * 4 * T + T * D * 4


def attention_model(T=5, D=8, H=2):
    b = Builder()
    x = b.input("x", [1, T, D])
    heads = b.i64("heads_shape", [1, T, H, D // H])  # shared by the three reshapes
    q = b.op("Transpose", [b.op("Reshape", [b.matmul("wq", x, D, D), heads], name="q_rs")], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [b.op("Reshape", [b.matmul("wk", x, D, D), heads], name="k_rs")], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [b.op("Reshape", [b.matmul("wv", x, D, D), heads], name="v_rs")], perm=[0, 2, 1, 3])
    s = b.op("MatMul", [q, k], name="qk")
    s = b.op("Mul", [s, b.const("scale", np.array(1 / np.sqrt(D // H), np.float32))])
    p = b.op("Softmax", [s], name="softmax", axis=-1)
    o = b.op("Transpose", [b.op("MatMul", [p, v], name="pv")], perm=[0, 2, 1, 3])
    o = b.op("Reshape", [o, b.i64("merge_shape", [1, T, D])], name="merge")
    b.output(b.matmul("wo", o, D, D))
    return b.model()


def test_attention_two_heads():
    m = attention_model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"wq": (2, 0, None), "wo": (8, 8, OUT)})
    assert group_of(analysis, "wq").sources == ["wq", "wk", "wv"]
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("wq", 1): (8, 4), ("wk", 1): (8, 4), ("wv", 1): (8, 4), ("wo", 1): (4, 8)})
    for rs in ("q_rs", "k_rs", "v_rs"):
        assert list(param_value(res.pruned, rs, 1)) == [1, 5, 1, 4]
    assert list(param_value(res.pruned, "merge", 1)) == [1, 5, 4]
    # MACs: 4 projections 5*8*8, q.k^T and p.v 2*5*5*4 each
    assert res.report["macs"]["before"] == 4 * 5 * 8 * 8 + 2 * (2 * 5 * 5 * 4)
    assert res.report["macs"]["after"] == 4 * 5 * 8 * 4 + 2 * (1 * 5 * 5 * 4)


def test_attention_dead_head_matches_original():
    cols = [0, 1, 2, 3]  # head 0
    m = zeroed(attention_model(), {"wq.weight": (1, cols), "wk.weight": (1, cols), "wv.weight": (1, cols),
                                   "wo.weight": (0, cols)})
    res = prune_and_check(m, 0.5, equal_original=True)
    np.testing.assert_array_equal(param_value(res.pruned, "wo", 1), param_value(m, "wo", 1)[4:])


def test_attention_head_axis_frozen_on_one_side_freezes_the_other():
    """Q·Kᵀ pairs Q's head i with K's head i: K's head axis frozen upstream (here by an op without a rule) must
    freeze Q's heads too, or the pruned Q has fewer heads than K and the model does not run."""
    b = Builder()
    T, D, H = 5, 8, 2
    x = b.input("x", [1, T, D])
    heads = b.i64("heads_shape", [1, T, H, D // H])
    q = b.op("Transpose", [b.op("Reshape", [b.matmul("wq", x, D, D), heads], name="q_rs")], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [b.op("Reshape", [b.matmul("wk", x, D, D), heads], name="k_rs")], perm=[0, 2, 3, 1])
    k = b.op("Einsum", [k], name="opaque", equation="nhdt->nhdt")
    v = b.op("Transpose", [b.op("Reshape", [b.matmul("wv", x, D, D), heads], name="v_rs")], perm=[0, 2, 1, 3])
    p = b.op("Softmax", [b.op("MatMul", [q, k], name="qk")], axis=-1)
    o = b.op("Transpose", [b.op("MatMul", [p, v], name="pv")], perm=[0, 2, 1, 3])
    b.output(b.matmul("wo", b.op("Reshape", [o, b.i64("merge_shape", [1, T, D])], name="merge"), D, D))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"wq": (2, 2, "batched MatMul"), "wk": (2, 2, "Einsum 'opaque'"),
                             "wv": (2, 2, "batched MatMul"), "wo": (8, 8, OUT)})  # softmax(Q·Kᵀ) has no heads
    with pytest.raises(SpaError, match="no prunable group"):
        prune_and_check(m, 0.5)


# ---- opset 23: Attention, RotaryEmbedding, RMSNormalization ----------------------------------------------------------
def gqa_attention_model(T=5, D=16, hq=4, hkv=2, hs=4):
    """3-D grouped-query attention as an opset-23 graph: q/k/v projections, RotaryEmbedding on q and k (heads
    from num_heads), Attention(q_num_heads=4, kv_num_heads=2), the output projection."""
    b = Builder(opset=23)
    x = b.input("x", [1, T, D])
    cos = b.const("cos", np.cos(np.outer(np.arange(T), [1.0, 0.1])).astype(np.float32))  # [positions, hs/2]
    sin = b.const("sin", np.sin(np.outer(np.arange(T), [1.0, 0.1])).astype(np.float32))
    pos = b.i64("pos", [list(range(T))])
    q = b.op("RotaryEmbedding", [b.matmul("wq", x, D, hq * hs), cos, sin, pos], name="rope_q", num_heads=hq)
    k = b.op("RotaryEmbedding", [b.matmul("wk", x, D, hkv * hs), cos, sin, pos], name="rope_k", num_heads=hkv)
    v = b.matmul("wv", x, D, hkv * hs)
    y = b.op("Attention", [q, k, v], name="attn", q_num_heads=hq, kv_num_heads=hkv, is_causal=1)
    b.output(b.matmul("wo", y, hq * hs, D))
    return b.model()


def test_attention_op_grouped_query_3d():
    """A unit is one KV head with the two query heads sharing it (8 q, 4 k and 4 v channels): half the units
    go, and Attention's and RotaryEmbedding's head counts are rewritten."""
    m = gqa_attention_model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"wq": (2, 0, None), "wo": (16, 16, OUT)})
    assert group_of(analysis, "wq").sources == ["wq", "wk", "wv"]
    res = prune_and_check(m, 0.5, check_macs=False)
    assert_shapes(res.pruned, {("wq", 1): (16, 8), ("wk", 1): (16, 4), ("wv", 1): (16, 4), ("wo", 1): (8, 16)})
    assert (node_attr(res.pruned, "attn", "q_num_heads"), node_attr(res.pruned, "attn", "kv_num_heads")) == (2, 1)
    assert (node_attr(res.pruned, "rope_q", "num_heads"), node_attr(res.pruned, "rope_k", "num_heads")) == (2, 1)
    T, D = 5, 16
    attn = 4 * T * T * (4 + 4)  # heads x seq_q x seq_kv x (head_size + v_head_size)
    assert res.report["macs"]["before"] == T * D * (16 + 8 + 8) + attn + T * 16 * D
    assert res.report["macs"]["after"] == T * D * (8 + 4 + 4) + attn // 2 + T * 8 * D


def test_attention_op_4d_per_head_mask_is_cut():
    """4-D Attention: heads on axis 1 through the head reshapes; a constant per-head mask loses the removed
    heads' rows; a head-size axis reaching the op freezes (the default scale is 1/sqrt(head_size))."""
    T, D, H = 5, 8, 2
    b = Builder(opset=23)
    x = b.input("x", [1, T, D])
    heads = b.i64("heads_shape", [1, T, H, D // H])
    q, k, v = (b.op("Transpose", [b.op("Reshape", [b.matmul(w, x, D, D), heads])], perm=[0, 2, 1, 3])
               for w in ("wq", "wk", "wv"))
    mask = b.const("mask", np.triu(np.full((1, H, T, T), -1e4, np.float32), 1) + rand("m", (1, H, T, T), 0.1))
    o = b.op("Attention", [q, k, v, mask], name="attn")
    o = b.op("Reshape", [b.op("Transpose", [o], perm=[0, 2, 1, 3]), b.i64("merge", [1, T, D])])
    b.output(b.matmul("wo", o, D, D))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"wq": (2, 0, None), "wo": (8, 8, OUT)})
    res = prune_and_check(m, 0.5, check_macs=False)
    assert_shapes(res.pruned, {("wq", 1): (8, 4), ("wo", 1): (4, 8), ("attn", 3): (1, 1, T, T)})


def test_rms_normalization_is_channel_mixing_like_layernorm():
    b = Builder(opset=23)
    x = b.input("x", [1, 5, 8])
    y = b.op("RMSNormalization", [b.matmul("w1", x, 8, 12), b.weight("g", (12,), positive=True)], name="rms")
    b.output(b.matmul("w2", b.relu(b.matmul("w3", y, 12, 6)), 6, 3))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"w1": (12, 12, "RMSNormalization normalizes over the channel axis (channel-mixing)"),
                             "w3": (6, 0, None), "w2": (3, 3, OUT)})
    prune_and_check(m, 0.5)


# ---- no rule, graph outputs -----------------------------------------------------------------------------------------
def test_einsum_has_no_rule_frozen():
    def mid(b, y):
        return b.op("Einsum", [y], name="ein", equation="nchw->nchw"), 8

    m = frozen_middle(mid)
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "Einsum 'ein'"), "c2": (4, 4, OUT)})
    assert analysis.unruled_ops == {"Einsum": 1}
    assert "no propagation rule" in reasons_text(group_of(analysis, "c1"))
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c0", 1): (3, 3, 3, 3), ("c1", 1): (8, 3, 3, 3)})
    assert res.report["unruled_ops"] == {"Einsum": 1}


def test_custom_domain_op_frozen():
    b = Builder()
    b.extra_opsets["com.example"] = 1
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c0", x, 3, 6))
    y = b.op("Relu", [b.conv("c1", y, 6, 8)], name="custom", domain="com.example")
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()  # analysis only: onnxruntime cannot run the custom op
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, "Relu 'custom'"), "c2": (4, 4, OUT)})
    assert analysis.unruled_ops == {"com.example.Relu": 1}


def test_channel_reaching_graph_output_frozen():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c0", x, 3, 6))
    y = b.relu(b.conv("c1", y, 6, 8))
    b.output(y)
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, f"graph output '{y}'")})
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c0", 1): (3, 3, 3, 3), ("c1", 1): (8, 3, 3, 3)})


def test_intermediate_graph_output_frozen():
    """A tensor that is both a graph output and consumed inside the graph keeps its channels."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c0", x, 3, 6))
    mid = b.relu(b.conv("c1", y, 6, 8))
    b.output(mid)
    b.output(b.conv("c2", mid, 8, 4))
    m = b.model()
    _, analysis = analyse(m)
    assert_groups(analysis, {"c0": (6, 0, None), "c1": (8, 8, OUT), "c2": (4, 4, OUT)})
    prune_and_check(m, 0.5)


def test_nothing_prunable_is_an_error():
    b = Builder()
    x = b.input("x", [1, 16])
    b.output(b.gemm("g", x, 16, 4))
    with pytest.raises(SpaError, match="no prunable group"):
        driver.prune(b.model(), None, ratio=0.5)


# ---- the dead-channel equivalence ---------------------------------------------------------------------------------
def dead_chain():
    """c1 -> BN -> ReLU -> c2 -> BN -> ReLU -> c3 (output); channels {1, 4, 6} of c1 and {0, 3, 7} of c2 are dead
    in every parameter they own (weights, bias, BN scale/beta/mean/var)."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.bn("bn1", b.conv("c1", x, 3, 8), 8))
    y = b.relu(b.bn("bn2", b.conv("c2", y, 8, 8), 8))
    b.output(b.conv("c3", y, 8, 4))
    d1, d2 = [1, 4, 6], [0, 3, 7]
    spec = {"c1.weight": (0, d1), "c1.bias": (0, d1), "c2.weight": (0, d2), "c2.bias": (0, d2)}
    for bn, d in (("bn1", d1), ("bn2", d2)):
        for p in ("scale", "bias", "mean", "var"):
            spec[f"{bn}.{p}"] = (0, d)
    return zeroed(b.model(), spec), d1, d2


def test_dead_channels_pruned_model_equals_original():
    m, d1, d2 = dead_chain()
    # the dead channels are exactly zero after ReLU in the original
    plan = driver.plan(driver.load(m), ratio=0.4)
    analysis = driver.analyse(driver.load(m))
    g1, g2 = group_of(analysis, "c1"), group_of(analysis, "c2")
    assert plan.removed == {g1.id: d1, g2.id: d2}
    res = prune_and_check(m, 0.4, equal_original=True, seeds=(0, 1, 2, 3))
    assert_shapes(res.pruned, {("c1", 1): (5, 3, 3, 3), ("bn1", 1): (5,), ("c2", 1): (5, 5, 3, 3), ("bn2", 4): (5,),
                               ("c3", 1): (4, 5, 3, 3)})
    kept1, kept2 = [c for c in range(8) if c not in d1], [c for c in range(8) if c not in d2]
    np.testing.assert_array_equal(param_value(res.pruned, "c2", 1), param_value(m, "c2", 1)[kept2][:, kept1])
    np.testing.assert_array_equal(param_value(res.pruned, "c3", 1), param_value(m, "c3", 1)[:, kept2])


# ---- model forms ----------------------------------------------------------------------------------------------------
def test_initializers_listed_as_inputs():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.bn("bn", b.conv("c1", x, 3, 8), 8))
    b.output(b.conv("c2", y, 8, 4))
    m = b.model()
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(m, full_check=True)
    res = prune_and_check(m, 0.5)
    assert_shapes(res.pruned, {("c1", 1): (4, 3, 3, 3), ("c2", 1): (4, 4, 3, 3)})


# ---- verification itself ------------------------------------------------------------------------------------------
def test_verification_rejects_nan_outputs():
    from spa.errors import VerificationError
    from spa.passes import verify

    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    b.output(b.conv("c2", b.relu(b.conv("c1", x, 3, 8)), 8, 4))
    good = b.model()
    w = param_value(good, "c2", 1).copy()
    w[0, 0, 0, 0] = np.nan
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    for t in bad.graph.initializer:
        if t.name == "c2.weight":
            t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    with pytest.raises(VerificationError):
        verify.compare(good, bad, {"x": (1, 3, 8, 8)})
