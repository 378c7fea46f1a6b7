"""onnxruntime's saved fusions written back as standard ops (passes/unfuse.py): each covered contrib op gives the
same outputs in onnxruntime as the standard ops that replace it; uncovered forms stay as they are; a model
onnxruntime saved at ORT_ENABLE_EXTENDED prunes like its export."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import Builder, bert_as_onnxruntime_optimizes_it
from onnx import TensorProto, helper

from spa import driver
from spa.cli.summary import summary
from spa.ir import Graph
from spa.passes.unfuse import unfuse_contrib

MS = "com.microsoft"


def run(model: onnx.ModelProto, feeds: dict) -> list:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def unfused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = Graph(copy)
    n = sum(unfuse_contrib(g).values())
    return g.to_model(), n


def contrib_model(op: str, inputs: list, shapes: dict, out_shape, n_out: int = 1, **attrs) -> onnx.ModelProto:
    """One contrib node on the graph inputs named in `shapes`; other inputs are constants (name -> array)."""
    b = Builder(opset=17)
    b.extra_opsets[MS] = 1
    names = []
    for x in inputs:
        if isinstance(x, str) and x in shapes:
            names.append(b.input(x, shapes[x], TensorProto.INT32 if x in ("m", "ids", "pid") else TensorProto.FLOAT))
        elif isinstance(x, tuple):
            names.append(b.const(x[0], x[1]))
        else:
            names.append(x)
    outs = b.op(op, names, domain=MS, n_out=n_out, **attrs)
    b.output(outs if n_out == 1 else outs[0])
    return b.model()


RNG = np.random.default_rng(0)
W = (RNG.standard_normal((6, 4, 3, 3)) * 0.3).astype(np.float32)
B6 = RNG.standard_normal(6).astype(np.float32)
X = {"x": RNG.standard_normal((2, 4, 5, 5)).astype(np.float32)}
CONV = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])

CASES = {
    "FusedConv-Relu": (lambda: contrib_model("FusedConv", ["x", ("w", W), ("b", B6)], {"x": [2, 4, 5, 5]}, None,
                                             activation="Relu", **CONV), X, ["Conv", "Relu"]),
    "FusedConv-LeakyRelu": (lambda: contrib_model("FusedConv", ["x", ("w", W), ("b", B6)], {"x": [2, 4, 5, 5]}, None,
                                                  activation="LeakyRelu", activation_params=[0.2], **CONV),
                            X, ["Conv", "LeakyRelu"]),
    "FusedConv-HardSigmoid": (lambda: contrib_model("FusedConv", ["x", ("w", W)], {"x": [2, 4, 5, 5]}, None,
                                                    activation="HardSigmoid", activation_params=[0.2, 0.5], **CONV),
                              X, ["Conv", "HardSigmoid"]),
    "FusedConv-Clip": (lambda: contrib_model("FusedConv", ["x", ("w", W), ("b", B6)], {"x": [2, 4, 5, 5]}, None,
                                             activation="Clip", activation_params=[0.0, 6.0], **CONV),
                       X, ["Conv", "Clip"]),
    "FusedConv-Z": (lambda: contrib_model("FusedConv", ["x", ("w", W), ("b", B6), "z"],
                                          {"x": [2, 4, 5, 5], "z": [2, 6, 5, 5]}, None, activation="Sigmoid", **CONV),
                    {**X, "z": RNG.standard_normal((2, 6, 5, 5)).astype(np.float32)}, ["Conv", "Add", "Sigmoid"]),
    "FusedGemm-Tanh": (lambda: contrib_model("FusedGemm", ["a", ("w", RNG.standard_normal((3, 8)).astype(np.float32)),
                                                           ("c", B6[:3])], {"a": [2, 8]}, None, activation="Tanh",
                                             transB=1, alpha=0.5),
                       {"a": RNG.standard_normal((2, 8)).astype(np.float32)}, ["Gemm", "Tanh"]),
    "FusedMatMul-alpha": (lambda: contrib_model("FusedMatMul", ["a", ("w", RNG.standard_normal((8, 3)).astype(
        np.float32))], {"a": [2, 5, 8]}, None, alpha=0.25), {"a": RNG.standard_normal((2, 5, 8)).astype(np.float32)},
        ["MatMul", "Mul"]),
    "Gelu": (lambda: contrib_model("Gelu", ["a"], {"a": [2, 7]}, None),
             {"a": RNG.standard_normal((2, 7)).astype(np.float32) * 3}, ["Div", "Erf", "Add", "Mul", "Mul"]),
    "BiasGelu": (lambda: contrib_model("BiasGelu", ["a", ("bias", B6[:4])], {"a": [3, 4]}, None),
                 {"a": RNG.standard_normal((3, 4)).astype(np.float32)}, ["Add", "Div", "Erf", "Add", "Mul", "Mul"]),
    "FastGelu": (lambda: contrib_model("FastGelu", ["a", ("bias", B6[:4])], {"a": [3, 4]}, None),
                 {"a": RNG.standard_normal((3, 4)).astype(np.float32) * 2},
                 ["Add", "Pow", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"]),
    "QuickGelu": (lambda: contrib_model("QuickGelu", ["a"], {"a": [3, 4]}, None, alpha=1.702),
                  {"a": RNG.standard_normal((3, 4)).astype(np.float32) * 2}, ["Mul", "Sigmoid", "Mul"]),
    "SkipLayerNormalization": (lambda: contrib_model(
        "SkipLayerNormalization", ["a", "s", ("gamma", B6[:4] + 1), ("beta", B6[2:6])],
        {"a": [2, 3, 4], "s": [2, 3, 4]}, None, epsilon=1e-5),
        {"a": RNG.standard_normal((2, 3, 4)).astype(np.float32), "s": RNG.standard_normal((2, 3, 4)).astype(np.float32)},
        ["Add", "LayerNormalization"]),
    "SkipLayerNormalization-bias": (lambda: contrib_model(
        "SkipLayerNormalization", ["a", "s", ("gamma", B6[:4] + 1), ("beta", B6[2:6]), ("bias", B6[1:5])],
        {"a": [2, 3, 4], "s": [2, 3, 4]}, None, epsilon=1e-5),
        {"a": RNG.standard_normal((2, 3, 4)).astype(np.float32), "s": RNG.standard_normal((2, 3, 4)).astype(np.float32)},
        ["Add", "Add", "LayerNormalization"]),
}

QKV = (RNG.standard_normal((16, 48)) * 0.4).astype(np.float32)
QKV_BIAS = RNG.standard_normal(48).astype(np.float32)
TOKENS = {"t": RNG.standard_normal((2, 5, 16)).astype(np.float32)}
ATTENTION = ["MatMul", "Add", "Reshape", "Transpose"] * 3 + ["MatMul", "Mul", "Softmax", "MatMul", "Transpose",
                                                              "Reshape"]
CASES.update({
    "Attention": (lambda: contrib_model("Attention", ["t", ("qkv", QKV), ("qkv_bias", QKV_BIAS)], {"t": [2, 5, 16]},
                                        None, num_heads=2), TOKENS, ATTENTION),
    # V narrower than Q/K, no bias, an explicit scale, and a 0/1 mask over the keys (row 0 pads its last two)
    "Attention-mask": (lambda: contrib_model(
        "Attention", ["t", ("qkv", QKV[:, :40]), "", "m"], {"t": [2, 5, 16], "m": [2, 5]}, None, num_heads=4,
        qkv_hidden_sizes=[16, 16, 8], scale=0.3),
        {**TOKENS, "m": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)},
        [op for op in ATTENTION if op != "Add"][:-4] + ["Greater", "Where", "Reshape", "Add", "Softmax", "MatMul",
                                                        "Transpose", "Reshape"]),
    # position ids given (the rows of the position table they pick), no segments, the sum output kept
    "EmbedLayerNormalization": (lambda: contrib_model(
        "EmbedLayerNormalization", ["ids", "", ("word", QKV.T[:, :16].copy()), ("position", QKV[:8, 12:28]), "",
                                    ("gamma", QKV_BIAS[:16] + 2), ("beta", QKV_BIAS[16:32]), "", "pid"],
        {"ids": [2, 5], "pid": [1, 5]}, None, n_out=2, epsilon=1e-5),
        {"ids": RNG.integers(0, 48, (2, 5)).astype(np.int32), "pid": np.array([[3, 1, 4, 1, 5]], np.int32)},
        ["Gather", "Gather", "Add", "LayerNormalization"]),
})


@pytest.mark.parametrize("case", list(CASES))
def test_a_covered_fusion_gives_the_same_outputs_as_standard_ops(case):
    build, feeds, ops = CASES[case]
    model = build()
    plain, n = unfused(model)
    assert n == 1 and [node.op_type for node in plain.graph.node] == ops
    assert all(node.domain in ("", "ai.onnx") for node in plain.graph.node)
    onnx.checker.check_model(plain, full_check=True)
    np.testing.assert_allclose(run(plain, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_the_sum_output_of_a_skip_layer_norm_is_kept_and_its_statistics_block_the_rewrite():
    """Its 4th output (input + skip) feeds the next residual: the Add writes it. A graph that reads the mean
    keeps the fused node."""
    b = Builder(opset=17)
    b.extra_opsets[MS] = 1
    a, s = b.input("a", [2, 3, 4]), b.input("s", [2, 3, 4])
    g_, be = b.const("gamma", np.ones(4, np.float32) * 1.5), b.const("beta", np.full(4, 0.1, np.float32))
    b.nodes.append(helper.make_node("SkipLayerNormalization", [a, s, g_, be], ["ln", "", "", "sum"], domain=MS,
                                    name="sln", epsilon=1e-5))
    b.output(b.op("Add", ["ln", "sum"]))
    model = b.model()
    feeds = {"a": RNG.standard_normal((2, 3, 4)).astype(np.float32), "s": RNG.standard_normal((2, 3, 4)).astype(np.float32)}
    plain, n = unfused(model)
    assert n == 1 and plain.graph.node[0].output[0] == "sum"
    np.testing.assert_allclose(run(plain, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    model.graph.node[0].output[1] = "mean"   # the mean is read: not a LayerNormalization's output
    model.graph.output.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    assert unfused(model)[1] == 0


def test_uncovered_forms_stay_fused():
    transposed = contrib_model("FusedMatMul", ["a", ("w", RNG.standard_normal((3, 8)).astype(np.float32))],
                               {"a": [2, 8]}, None, transB=1)
    unknown = contrib_model("FusedConv", ["x", ("w", W)], {"x": [2, 4, 5, 5]}, None, activation="Softsign", **CONV)
    for model in (transposed, unknown):
        plain, n = unfused(model)
        assert n == 0 and plain.graph.node[0].domain == MS


def test_a_model_onnxruntime_saved_with_its_fusions_prunes_like_the_export(tmp_path):
    """The zoo's small ResNet-18 as onnxruntime saves it at ORT_ENABLE_EXTENDED (FusedConv = Conv + Relu): the
    same groups and MACs as the export, verified against the saved model (refused with exit 2 before)."""
    from spa.models import zoo_path

    src = zoo_path("resnet18", small=True)
    saved = tmp_path / "ext.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(saved)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    assert any(n.op_type == "FusedConv" for n in onnx.load(saved).graph.node)
    ours = driver.prune(str(saved), str(tmp_path / "o.onnx"), ratio=0.5, fast=True).report
    export = driver.prune(str(src), None, ratio=0.5, fast=True).report
    assert ours["verification"]["status"] == "passed"
    assert ours["macs"] == export["macs"] and [g["kept"] for g in ours["per_group"]] == \
        [g["kept"] for g in export["per_group"]]
    assert ours["normalize"]["contrib_fusions_unfused"] == 9
    assert "9 onnxruntime contrib fusions (FusedConv x9) written as the standard ops" in summary(ours)


@pytest.mark.parametrize("op, inputs, attrs", [
    ("Gelu", [], {}),                                     # no input
    ("QuickGelu", ["x"], {"alpha": "abc"}),               # a string where a float belongs
    ("FusedConv", ["x", "w"], {"activation": "HardSigmoid", "activation_params": [0.1]}),   # one of two params
])
def test_a_malformed_contrib_node_stays_fused_and_the_run_ends_in_one_line(tmp_path, capsys, op, inputs, attrs):
    """Bad input: the rewrite leaves the node as the file has it (it raised IndexError / ValueError into a
    traceback), and the run ends in one line."""
    from helpers import assert_one_line_error, run_cli

    b = Builder(opset=17)
    b.extra_opsets[MS] = 1
    x = b.relu(b.conv("c0", b.input("x", [1, 3, 8, 8]), 3, 3))
    b.weight("w", (3, 3, 3, 3))
    y = b.op(op, [{"x": x, "w": "w"}[i] for i in inputs], domain=MS, **attrs)
    b.output(b.conv("c9", b.relu(y), 3, 2))
    src = tmp_path / "m.onnx"
    onnx.save(b.model(), str(src))
    copy, n = unfused(b.model())
    assert n == 0
    rc, _, err = run_cli([src, tmp_path / "o.onnx", "--ratio", "0.5"], capsys)
    assert_one_line_error(rc, err)
    assert not (tmp_path / "o.onnx").exists()


def attention_block(heads: int = 4, d: int = 32, seq: int = 6) -> onnx.ModelProto:
    """A transformer block as onnxruntime's optimizer or onnxsim's simplifier saves it: self-attention as one
    com.microsoft::Attention node (packed Q/K/V weights), an output projection, residual, LayerNorm, MLP."""
    rng = np.random.default_rng(0)

    def w(name, rows, cols):
        return b.const(name, (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32))

    b = Builder(opset=17)
    b.extra_opsets[MS] = 1
    x = b.input("x", [2, seq, d])
    att = b.op("Attention", [x, w("qkv", d, 3 * d), b.const("qkv_bias", rng.standard_normal(3 * d).astype(
        np.float32) * 0.1)], domain=MS, num_heads=heads)
    h = b.op("Add", [x, b.op("MatMul", [att, w("wo", d, d)])])
    ln = b.op("LayerNormalization", [h, b.const("g", np.ones(d, np.float32)), b.const("be", np.zeros(d, np.float32))],
              axis=-1)
    up = b.op("Relu", [b.op("MatMul", [ln, w("w1", d, 2 * d)])])
    b.output(b.op("Add", [ln, b.op("MatMul", [up, w("w2", 2 * d, d)])]))
    return b.model()


def test_an_attention_node_prunes_by_heads(tmp_path):
    """The packed Attention froze the block's heads and stopped the data passes (no torch lowering: the default
    fell back to --fast). Written back as standard ops, its heads form one group of 4 units; half of them go
    with --ratio 0.5, and the default command runs its data passes; both verified against the fused file."""
    src = tmp_path / "att.onnx"
    onnx.save(attention_block(), str(src))
    fast = driver.prune(str(src), str(tmp_path / "fast.onnx"), ratio=0.5, fast=True).report
    heads = [g for g in fast["per_group"] if g["units"] == 4]
    assert fast["normalize"]["contrib_fusions_unfused"] == 1
    assert fast["verification"]["status"] == "passed" and [g["kept"] for g in heads] == [2]
    default = driver.prune(str(src), str(tmp_path / "default.onnx"), target_flops=0.6).report
    assert default["verification"]["status"] == "passed"
    assert not any("cannot run" in w for w in default["warnings"])
    assert default["importance"]["criterion"] == "obspa" and default["macs"]["ratio"] <= 0.6


@pytest.mark.parametrize("opset", [17, 14])   # before 17 its LayerNormalizations are written as their ops
def test_a_bert_as_onnxruntime_optimizes_it_computes_the_same_and_prunes_by_heads(tmp_path, opset):
    """Every contrib op of onnxruntime's optimized BERT is written back (EmbedLayerNormalization's mask lengths
    as a count of ones, Attention's key mask from them): the same outputs on a padded batch; EmbedLayerNormalization
    left every tensor after it without a shape (MACs uncounted, groups frozen) and Attention froze the heads."""
    model = bert_as_onnxruntime_optimizes_it(opset=opset)
    plain, n = unfused(model)
    assert n == 5 and all(node.domain in ("", "ai.onnx") for node in plain.graph.node)
    onnx.checker.check_model(plain, full_check=True)
    feeds = {"ids": RNG.integers(0, 50, (2, 6)).astype(np.int32),
             "segments": np.array([[0] * 3 + [1] * 3] * 2, np.int32),
             "mask": np.array([[1, 1, 1, 1, 0, 0], [1] * 6], np.int32)}
    np.testing.assert_allclose(run(plain, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    src = tmp_path / "bert.onnx"
    onnx.save(model, str(src))
    rep = driver.prune(str(src), str(tmp_path / "o.onnx"), ratio=0.5, fast=True).report
    assert rep["verification"]["status"] == "passed"
    assert rep["normalize"]["contrib_fusions_by_op"] == {"EmbedLayerNormalization": 1, "Attention": 1,
                                                         "SkipLayerNormalization": 2, "BiasGelu": 1}
    assert [(g["units"], g["kept"]) for g in rep["per_group"] if g["units"] in (4, 64)] == [(4, 2), (64, 32)]
    assert "5 onnxruntime contrib fusions (EmbedLayerNormalization x1, Attention x1, SkipLayerNormalization x2, " \
           "BiasGelu x1)" in summary(rep)


def test_attention_masked_by_lengths_summed_from_the_mask():
    """RoBERTa as onnxruntime's optimizer saves it: the key lengths are ReduceSum(Cast(mask), axis 1) (no
    EmbedLayerNormalization); a 1-D mask of other origin (start and end positions are possible) stays fused."""
    b = Builder(opset=17)
    b.extra_opsets[MS] = 1
    t, mask = b.input("t", [2, 5, 16]), b.input("mask", [2, 5], TensorProto.INT64)
    lengths = b.op("ReduceSum", [b.op("Cast", [mask], to=TensorProto.INT32), b.const("axes", np.array([1]))],
                   keepdims=0)
    b.output(b.op("Attention", [t, b.const("qkv", QKV), b.const("qkv_bias", QKV_BIAS), lengths], domain=MS,
                  num_heads=2))
    model = b.model()
    plain, n = unfused(model)
    assert n == 1
    feeds = {**TOKENS, "mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)}
    np.testing.assert_allclose(run(plain, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    given = contrib_model("Attention", ["t", ("qkv", QKV), ("qkv_bias", QKV_BIAS), "m"], {"t": [2, 5, 16], "m": [2]},
                          None, num_heads=2)            # a 1-D mask given as an input: its layout is not known
    assert unfused(given)[1] == 0


def test_rms_norms_and_rotary_embeddings_as_the_transformer_optimizer_writes_them():
    """A Llama block's pieces as onnxruntime's transformer optimizer saves them: SimplifiedLayerNormalization in
    the default domain (onnx.checker calls the file invalid: an onnxruntime operator), RotaryEmbedding on
    [batch, heads, sequence, head size] with position ids, SkipSimplifiedLayerNormalization with a bias and its
    sum output. Written back: a valid model with the same outputs; an interleaved rotary stays fused."""
    b = Builder(opset=17)
    b.extra_opsets[MS] = 1
    t, pos = b.input("t", [2, 5, 16]), b.input("pos", [2, 5], TensorProto.INT64)
    gamma = b.const("gamma", QKV_BIAS[:16] + 1.5)
    normed = b.op("SimplifiedLayerNormalization", [t, gamma], axis=-1, epsilon=1e-5)
    heads = b.op("Transpose", [b.op("Reshape", [normed, b.const("split", np.array([2, 5, 2, 8]))])],
                 perm=[0, 2, 1, 3])
    angles = np.arange(12)[:, None] * (0.5 ** np.arange(4))[None, :]
    rotated = b.op("RotaryEmbedding", [heads, pos, b.const("cos", np.cos(angles).astype(np.float32)),
                                       b.const("sin", np.sin(angles).astype(np.float32))], domain=MS)
    merged = b.op("Reshape", [b.op("Transpose", [rotated], perm=[0, 2, 1, 3]), b.const("merge", np.array([2, 5, 16]))])
    b.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [merged, t, gamma, b.const("bias", QKV_BIAS[
        16:32])], ["out", "", "", "sum"], domain=MS, name="ssln", epsilon=1e-5))
    b.output("out")
    b.output("sum")
    model = b.model()
    plain, n = unfused(model)
    assert n == 3 and all(node.domain in ("", "ai.onnx") for node in plain.graph.node)
    assert "SimplifiedLayerNormalization" not in {node.op_type for node in plain.graph.node}
    onnx.checker.check_model(plain, full_check=True)
    feeds = {**TOKENS, "pos": np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], np.int64)}
    for got, want in zip(run(plain, feeds), run(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    next(node for node in model.graph.node if node.op_type == "RotaryEmbedding").attribute.append(
        helper.make_attribute("interleaved", 1))
    assert unfused(model)[1] == 2


def test_a_partial_rotary_on_a_slice_with_computed_positions():
    """GPT-NeoX / Phi-3 / Gemma as the optimizer writes them: the rotary part of each head sliced off before the
    op (its caches half that part's width), the positions Unsqueeze(Range(0, S)) with the axes in a Constant
    node: ranks read through the ops that make them (no shape inference yet), the same outputs."""
    b = Builder(opset=17)
    b.extra_opsets[MS] = 1
    t = b.input("t", [1, 5, 16])
    heads = b.op("Transpose", [b.op("Reshape", [t, b.const("split", np.array([1, 5, 2, 8]))])], perm=[0, 2, 1, 3])
    bounds = [b.const(name, np.array([v])) for name, v in (("s0", 0), ("s4", 4), ("s8", 8), ("ax", -1))]
    head, rest = b.op("Slice", [heads, bounds[0], bounds[1], bounds[3]]), b.op("Slice", [heads, bounds[1], bounds[2],
                                                                                           bounds[3]])
    length = b.op("Gather", [b.op("Shape", [t]), b.const("one", np.array(1))], axis=0)
    steps = b.op("Range", [b.const("zero", np.array(0)), length, b.const("step", np.array(1))])
    b.nodes.append(helper.make_node("Constant", [], ["axes0"], value=onnx.numpy_helper.from_array(np.array([0]))))
    positions = b.op("Unsqueeze", [steps, "axes0"])
    angles = np.arange(12)[:, None] * (0.5 ** np.arange(2))[None, :]
    rotated = b.op("RotaryEmbedding", [head, positions, b.const("cos", np.cos(angles).astype(np.float32)),
                                       b.const("sin", np.sin(angles).astype(np.float32))], domain=MS)
    b.output(b.op("Concat", [rotated, rest], axis=-1))
    model = b.model()
    plain, n = unfused(model)
    assert n == 1
    feeds = {"t": TOKENS["t"][:1]}
    np.testing.assert_allclose(run(plain, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_rewrite_that_computes_otherwise_is_caught_and_the_fusions_stay(tmp_path, monkeypatch):
    """Verification compares the pruned model with the normalized original, so the rewrite itself is checked
    against the file as given: a written-back Attention whose scale is wrong (a stand-in for a rewrite bug) is
    refused there, the node stays fused, and a warning says why; a right one passes without a warning."""
    import spa.passes.normalize as normalize
    from spa.loading import load

    src = tmp_path / "att.onnx"
    onnx.save(attention_block(), str(src))
    right = load(str(src))
    assert not right.warnings and not any(n.domain == MS for n in right.graph.model.graph.node)
    real = normalize.unfuse_contrib

    def wrong(g):
        done = real(g)
        scale = next(n for n in g.model.graph.node if n.op_type == "Mul" and n.name.endswith("_scaled"))
        g.set_const(scale.input[1], np.asarray(g.const(scale.input[1])) * 1.5)
        return done

    monkeypatch.setattr(normalize, "unfuse_contrib", wrong)
    refused = load(str(src))
    assert [n.op_type for n in refused.graph.model.graph.node if n.domain == MS] == ["Attention"]
    assert len(refused.warnings) == 1 and "were left as the file has them" in refused.warnings[0]
    assert "relative error" in refused.warnings[0]
