"""Subgraphs (issue 15 item 4): the rules run inside If branches and Loop/Scan bodies; weights inside branches are
sources, cut inside the bodies; an If output unifies the branches; verification checks both branches (each If's
condition forced true and false) and the checker's full check passes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (
    Builder,
    analyse,
    assert_one_line_error,
    conv,
    group_of,
    prune_and_check,
    rand,
    reasons_text,
    run_cli,
    run_model,
    tensor,
)
from onnx import TensorProto, helper

from spa import driver
from spa.errors import SpaError, VerificationError
from spa.passes import verify
from spa.passes.apply import Apply


def branch(tag: str, x: str, c: int = 8, hidden: int = 16) -> onnx.GraphProto:
    """Conv(c -> hidden) -> Relu -> Conv(hidden -> c), reading the outer tensor x."""
    n1, i1 = conv(f"{tag}_c1", x, c, hidden)
    relu = helper.make_node("Relu", [f"{tag}_c1_out"], [f"{tag}_r"], name=f"{tag}_relu")
    n2, i2 = conv(f"{tag}_c2", f"{tag}_r", hidden, c, out=f"{tag}_y")
    return helper.make_graph(n1 + [relu] + n2, tag, [], [helper.make_tensor_value_info(
        f"{tag}_y", TensorProto.FLOAT, [1, c, 8, 8])], initializer=i1 + i2)


def if_model(same_names: bool = False) -> onnx.ModelProto:
    """x -> c0 -> Relu -> If(flag){Conv->Relu->Conv | Conv->Relu->Conv} -> c3 -> out. With `same_names` both
    branches use the same tensor and node names (sibling scopes may: normalization renames)."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    b.input("flag", [], TensorProto.BOOL)
    y = b.relu(b.conv("c0", x, 3, 8))
    then_b = branch("then", y)
    else_b = branch("then" if same_names else "else", y)
    if same_names:  # other values, same names
        for t in else_b.initializer:
            t.CopyFrom(tensor(t.name, rand(t.name + "/else", tuple(t.dims))))
    b.op("If", ["flag"], name="if", then_branch=then_b, else_branch=else_b)
    b.output(b.conv("c3", "if_out", 8, 4))
    return b.model()


def body_init(model: onnx.ModelProto, name: str) -> tuple:
    for n in model.graph.node:
        for a in n.attribute:
            for t in a.g.initializer:
                if t.name == name:
                    return tuple(t.dims)
    raise KeyError(name)


def test_if_branch_weights_are_groups_and_the_output_unifies_both_branches():
    _, an = analyse(if_model())
    table = {tuple(sorted(g.sources)): (g.size, int(g.frozen.sum())) for g in an.groups}
    assert table == {("c0",): (8, 0), ("then_c1",): (16, 0), ("else_c1",): (16, 0),
                     ("else_c2", "then_c2"): (8, 0), ("c3",): (4, 4)}
    unified = group_of(an, "then_c2")
    assert "else_c2" in unified.sources and unified.prunable == 8


@pytest.mark.parametrize("same_names", [False, True])
def test_if_branches_prune_identically_and_verify_with_the_condition_both_ways(same_names):
    model = if_model(same_names)
    res = prune_and_check(model, 0.5, check_macs=False)  # count_macs sees the main graph only
    # every body node counted once (both branches): c0 + c3 + 2 x (c1 + c2), at full and at half width
    macs = lambda c_in, c_out, c0, c3: 64 * 9 * (3 * c0 + c0 * c3 * 0 + c3 * 4 + 2 * 2 * c_in * c_out)  # noqa: E731
    assert res.report["macs"]["before"] == macs(8, 16, 8, 8) == 327168
    assert res.report["macs"]["after"] == macs(4, 8, 4, 4) == 89856
    ver = res.report["verification"]
    assert ver["if_conditions_forced"] == [True, False]
    assert res.report["groups"]["pruned"] == 4
    pruned = res.pruned
    then_name, else_name = ("then", "then_1") if same_names else ("then", "else")
    assert body_init(pruned, f"{then_name}_c1.weight") == (8, 4, 3, 3)
    assert body_init(pruned, f"{then_name}_c2.weight") == (4, 8, 3, 3)
    if not same_names:
        assert body_init(pruned, "else_c1.weight") == (8, 4, 3, 3)
        assert body_init(pruned, "else_c2.weight") == (4, 8, 3, 3)
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for flag in (True, False):  # both branches run, and the If output's channels are cut the same in both
        out = run_model(pruned, {"x": x, "flag": np.array(flag)})[0]
        assert out.shape == (1, 4, 8, 8) and np.isfinite(out).all()


def test_a_wrong_cut_in_one_branch_fails_verification():
    """The forced-condition runs check the branch the random draws did not take: cut one branch's hidden weight
    wrongly and verification must refuse it, whichever way the drawn flag falls."""
    model = if_model()
    m, an = analyse(model)
    removed = set(an.groups[[i for i, g in enumerate(an.groups) if "else_c1" in g.sources][0]].units[:4].tolist())
    original = onnx.ModelProto()
    original.CopyFrom(m.graph.to_model())
    reference = verify.build_reference(original, an, removed, an.node_index)
    Apply(an, removed).run(m)
    pruned, spoiled = m.graph.to_model(), False
    for n in pruned.graph.node:  # spoil the else branch: another slice of its second conv's input
        if n.op_type == "If":
            else_b = next(a.g for a in n.attribute if a.name == "else_branch")
            for t in else_b.initializer:
                if t.name.startswith("else_c2.weight"):
                    arr = onnx.numpy_helper.to_array(t)[:, ::-1].copy()
                    t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
                    spoiled = True
    assert spoiled
    shapes = {"x": (1, 3, 8, 8), "flag": ()}
    with pytest.raises(VerificationError, match="differs"):
        verify.compare(reference, pruned, shapes)


def test_an_if_output_with_channels_in_one_branch_only_is_frozen():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    b.input("flag", [], TensorProto.BOOL)
    y = b.relu(b.conv("c0", x, 3, 8))
    other = helper.make_graph([helper.make_node("Neg", [y], ["neg_y"], name="neg")], "other", [],
                              [helper.make_tensor_value_info("neg_y", TensorProto.FLOAT, [1, 8, 8, 8])])
    b.op("If", ["flag"], name="if", then_branch=branch("then", y), else_branch=other)
    b.output(b.conv("c3", "if_out", 8, 4))
    _, an = analyse(b.model())
    g = group_of(an, "then_c2")
    # c0's channels reach the If output through the else branch unchanged: one group with then_c2's, which
    # Neg's branch gives position by position, so they unify instead of freezing
    assert "c0" in g.sources and g.prunable == 8
    assert group_of(an, "then_c1").prunable == 16
    res = prune_and_check(b.model(), 0.5, check_macs=False)
    assert res.report["verification"]["if_conditions_forced"] == [True, False]


def test_an_if_output_with_a_constant_in_the_other_branch_is_frozen():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    b.input("flag", [], TensorProto.BOOL)
    y = b.relu(b.conv("c0", x, 3, 8))
    zeros = tensor("zeros", np.zeros((1, 8, 8, 8), np.float32))
    other = helper.make_graph([helper.make_node("Identity", ["zeros"], ["z_out"], name="ident")], "other", [],
                              [helper.make_tensor_value_info("z_out", TensorProto.FLOAT, [1, 8, 8, 8])],
                              initializer=[zeros])
    b.op("If", ["flag"], name="if", then_branch=branch("then", y), else_branch=other)
    b.output(b.conv("c3", "if_out", 8, 4))
    _, an = analyse(b.model())
    g = group_of(an, "then_c2")
    assert g.prunable == 0 and "If output 0" in reasons_text(g)
    assert group_of(an, "then_c1").prunable == 16  # the hidden width stays inside the branch
    prune_and_check(b.model(), 0.5, check_macs=False)


def loop_model() -> onnx.ModelProto:
    """A Loop (3 iterations) whose body runs an MLP on the carried state: h <- h + W2·relu(W1·h)."""
    hidden = 16
    w1, w2 = tensor("w1", rand("w1", (8, hidden))), tensor("w2", rand("w2", (hidden, 8)))
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w1"], ["a"], name="fc1"),
         helper.make_node("Relu", ["a"], ["r"], name="act"),
         helper.make_node("MatMul", ["r", "w2"], ["d"], name="fc2"),
         helper.make_node("Add", ["h_in", "d"], ["h_out"], name="res"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 8])], initializer=[w1, w2])
    b = Builder()
    x = b.input("x", [1, 4])
    h0 = b.linear("fc0", x, 4, 8)
    b.const("trips", np.array(3, np.int64))
    b.const("go", np.array(True))
    b.op("Loop", ["trips", "go", h0], name="loop", body=body)
    b.output(b.linear("head", "loop_out", 8, 2))
    return b.model()


def test_loop_body_mlp_prunes_its_hidden_width_and_carried_values_are_frozen():
    _, an = analyse(loop_model())
    hidden = group_of(an, "fc1")
    assert hidden.size == 16 and hidden.prunable == 16
    carried = group_of(an, "fc0")
    assert carried.prunable == 0 and "loop-carried value of a Loop body" in reasons_text(carried)
    assert group_of(an, "fc2").prunable == 0
    res = prune_and_check(loop_model(), 0.5, check_macs=False)
    assert res.report["groups"]["pruned"] == 1
    shapes = {t.name: tuple(t.dims) for n in res.pruned.graph.node for a in n.attribute for t in a.g.initializer}
    assert shapes["w1"] == (8, 8) and shapes["w2"] == (8, 8)


def test_torch_passes_name_the_control_flow_and_the_default_falls_back(tmp_path):
    """Data asked for by name: one line naming the If and --fast. The default mode: pruned as --fast prunes,
    verified, with a warning that says why (the plain command works on such a model)."""
    path = tmp_path / "if.onnx"
    onnx.save(if_model(), str(path))
    for asked in ({"importance": "obspa"}, {"reconstruct": True}, {"synth_steps": 0}, {"input_range": {"*": (0, 1)}}):
        with pytest.raises(SpaError, match="If node 'if' has a subgraph.*--fast"):
            driver.prune(str(path), None, ratio=0.5, **asked)
    default = driver.prune(str(path), str(tmp_path / "out.onnx"), ratio=0.5).report
    fast = driver.prune(str(path), str(tmp_path / "fast.onnx"), ratio=0.5, fast=True).report
    assert default["verification"]["status"] == "passed"
    assert default["importance"]["criterion"] == "l2" and default["reconstruction"] is None
    assert "If node 'if' has a subgraph" in default["warnings"][0] and "as --fast does" in default["warnings"][0]
    assert default["per_group"] == fast["per_group"] and default["macs"] == fast["macs"]
    assert (tmp_path / "out.onnx").read_bytes() == (tmp_path / "fast.onnx").read_bytes()
    named = driver.prune(str(path), None, ratio=0.5, importance="l1").report   # a weight criterion named: kept
    assert named["importance"]["criterion"] == "l1" and named["reconstruction"] is None


def test_the_plain_command_prunes_a_control_flow_model_and_says_how(tmp_path, capsys):
    path, out = tmp_path / "if.onnx", tmp_path / "out.onnx"
    onnx.save(if_model(), str(path))
    rc, stdout, stderr = run_cli([path, out, "--ratio", "0.5"], capsys)
    summary = stdout + stderr
    assert rc == 0 and out.exists() and "as --fast does" in summary and "If node 'if'" in summary
    rc, _, err = run_cli([path, tmp_path / "asked.onnx", "--ratio", "0.5", "--importance", "obspa"], capsys)
    assert_one_line_error(rc, err, "If node 'if' has a subgraph", "add --fast")
    assert not (tmp_path / "asked.onnx").exists()


def test_torch_cond_export_prunes_both_branches(tmp_path):
    """torch.cond exported by torch.onnx (dynamo) gives an If whose branches are local functions or subgraphs."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.a = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                         torch.nn.Conv2d(16, 8, 3, padding=1))
            self.b = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                         torch.nn.Conv2d(16, 8, 3, padding=1))
            self.head = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x, flag):
            y = torch.relu(self.c0(x))
            y = torch.cond(flag, lambda t: self.a(t), lambda t: self.b(t), (y,))
            return self.head(y)

    path = tmp_path / "cond.onnx"
    try:
        torch.onnx.export(Net().eval(), (torch.randn(1, 3, 8, 8), torch.tensor(True)), str(path), dynamo=True,
                          opset_version=18)
    except Exception as e:  # noqa: BLE001 - an exporter that cannot export torch.cond here: nothing to test
        pytest.skip(f"torch.onnx cannot export torch.cond here: {type(e).__name__}")
    model = onnx.load(str(path))
    if not any(n.op_type == "If" for n in model.graph.node):
        pytest.skip("the exporter did not write an If")
    res = driver.prune(str(path), None, ratio=0.5, fast=True)
    assert res.report["verification"]["status"] == "passed"
    assert res.report["verification"].get("if_conditions_forced") == [True, False]
    assert res.report["groups"]["pruned"] >= 3


def test_a_budget_on_uncountable_macs_is_refused_or_warned():
    """--target-flops on a model whose MAC-carrying nodes all have unknown shapes (silero-vad: every conv inside
    If bodies) would prune nothing and print a ratio of 0.000: refused with a pointer to --ratio; with some
    counted, a warning names the others."""
    from types import SimpleNamespace

    import pytest

    from spa.errors import SpaError
    from spa.labels import NodeCost
    from spa.pipeline import check_countable

    costs = {"body/Conv": NodeCost(0, []), "body/Conv_1": NodeCost(0, [])}
    g = SimpleNamespace(model=onnx.ModelProto())   # no contrib op: no advice about onnxruntime's optimizer
    analysis = SimpleNamespace(ctx=SimpleNamespace(costs=costs, g=g), total_macs=0)
    with pytest.raises(SpaError, match="no MACs can be counted.*--ratio R"):
        check_countable(analysis, [])
    costs["main/Conv"] = NodeCost(1000, [])
    warnings: list[str] = []
    check_countable(SimpleNamespace(ctx=SimpleNamespace(costs=costs, g=g), total_macs=1000), warnings)
    assert len(warnings) == 1 and "MACs of 2 of 3" in warnings[0] and "'body/Conv'" in warnings[0]
    assert "onnxruntime" not in warnings[0]
    costs.pop("body/Conv"), costs.pop("body/Conv_1")
    check_countable(SimpleNamespace(ctx=SimpleNamespace(costs=costs, g=g), total_macs=1000), warnings)
    assert len(warnings) == 1


def test_constant_shape_arithmetic_in_a_branch_folds_so_its_macs_count(tmp_path):
    """A branch pads the outer input by pads computed from constants (ConstantOfShape, Concat, Reshape, a reversing
    Slice, Transpose, Cast: silero-vad's STFT padding) of an input declared [N, L] and
    fixed by --input-shape, then convolves: the small constant chain folds into the branch's own initializers,
    inference sees the padded length, and the conv's MACs count (8 x 514 x 3) instead of 0."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from spa import driver

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.int64)))

    then = helper.make_graph(
        [const("two", [2]), helper.make_node("ConstantOfShape", ["two"], ["zeros"],
                                              value=numpy_helper.from_array(np.zeros(1, np.int64))),
         const("p1", [0, 4]), helper.make_node("Concat", ["p1", "zeros"], ["flat"], axis=0),
         const("square", [2, 2]), helper.make_node("Reshape", ["flat", "square"], ["pairs"]),
         const("s0", [-1]), const("s1", [-(2 ** 62)]), const("s2", [0]), const("s3", [-1]),
         helper.make_node("Slice", ["pairs", "s0", "s1", "s2", "s3"], ["reversed"]),   # torch's pad order
         helper.make_node("Transpose", ["reversed"], ["pairs_t"], perm=[1, 0]), const("four", [4]),
         helper.make_node("Reshape", ["pairs_t", "four"], ["flat_t"]),
         helper.make_node("Cast", ["flat_t"], ["pads"], to=TensorProto.INT64),
         helper.make_node("Pad", ["x", "pads"], ["xp"]), const("ax", [1]),
         helper.make_node("Unsqueeze", ["xp", "ax"], ["xu"]), helper.make_node("Conv", ["xu", "w"], ["y"], name="conv")],
        "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 514])],
        [numpy_helper.from_array(np.ones((8, 1, 3), np.float32), "w")])
    other = helper.make_graph([const("ax2", [1]), helper.make_node("Unsqueeze", ["x", "ax2"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 1, 512])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=other)], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"]),
                               helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, None, None])])
    src = tmp_path / "branch.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    analysis = driver.analyse(driver.load(str(src), input_shapes={"x": (1, 512)}))
    assert analysis.total_macs == 8 * 514 * 3


def test_silero_vad_counts_the_macs_inside_its_branches():
    """silero-vad's convs all sit in If branches behind a constant padding chain that onnx's inference did not
    follow there: 0 MACs, and --target-flops refused. With the chain folded in the branches, both branches' convs
    count (the real file, where the cache has it: tools/sweep_wheels.py fetches it)."""
    from pathlib import Path

    import pytest

    from spa import driver

    path = Path.home() / ".cache" / "spa-prune" / "wheels" / "silero_vad-6.2.3" / "silero_vad" / "data" / "silero_vad.onnx"
    if not path.exists():
        pytest.skip("silero-vad 6.2.3 not in the cache (python tools/sweep_wheels.py --packages silero-vad)")
    analysis = driver.analyse(driver.load(str(path), input_shapes={"input": (1, 512), "state": (2, 1, 128)}))
    assert analysis.total_macs == 896_000                     # the STFT and encoder convs of both branches
    uncounted = sorted(name.split("/")[-3] for name, cost in analysis.ctx.costs.items() if cost.macs <= 0)
    assert uncounted == ["decoder", "decoder"]                 # after the LSTM: its output shape stays unknown
