"""What real exports hold that spa-prune must take without a traceback or a dead end (issue 15): no prunable source
in the main graph (quantized weights, weights only inside an If), a dynamic dim declared -1 (Paddle), a batch baked
into a Reshape or held at dim 1 of another input (silero-vad), models past protobuf's 2 GB.

Every fixture is built with onnx.helper, small, with the IR and opset versions real exports of that kind carry."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import Builder, assert_one_line_error, run_cli, run_model
from onnx import TensorProto, helper, numpy_helper

from spa import driver
from spa.errors import SpaError, VerificationError
from spa.passes import verify


def set_dims(vi: onnx.ValueInfoProto, dims) -> None:
    """Declared dims: an int is a dim_value (-1 too, as Paddle writes a dynamic dim), a str a dim_param."""
    shape = vi.type.tensor_type.shape
    shape.Clear()
    for d in dims:
        if isinstance(d, str):
            shape.dim.add().dim_param = d
        else:
            shape.dim.add().dim_value = d


def cnn(batch_dim="batch", reshape_batch=None) -> onnx.ModelProto:
    """Conv -> ReLU -> Conv -> ReLU -> (GlobalAveragePool -> Flatten | Reshape to a constant [B, -1]) -> Gemm,
    on a 1x3x8x8 input whose dim 0 is then declared `batch_dim`."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.relu(b.conv("c2", y, 8, 8))
    if reshape_batch is None:
        y = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
        k = 8
    else:  # what some exporters write for x.view(1, -1): the batch baked into the constant
        y = b.op("Reshape", [b.op("MaxPool", [y], kernel_shape=[4, 4], strides=[4, 4]),
                             b.i64("target", [reshape_batch, -1])])
        k = 8 * 2 * 2
    b.output(b.gemm("fc", y, k, 4))
    m = b.model()
    set_dims(m.graph.input[0], [batch_dim, 3, 8, 8])
    set_dims(m.graph.output[0], [batch_dim, 4])
    return m


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


# ---- no prunable source in the main graph: one line, exit 2, nothing written -------------------------------------
IR, OPSET_CF = 10, 21  # what current exporters write for these (onnxruntime 1.32 runs IR <= 13, opset <= 26)


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(tmp_path, capsys, model, *fragments) -> str:
    src = save(model, tmp_path / "in.onnx")
    before = snapshot(tmp_path)
    rc, _, err = run_cli([src, tmp_path / "out" / "o.onnx", "--target-flops", "0.5"], capsys)
    assert_one_line_error(rc, err, *fragments)
    assert snapshot(tmp_path) == before, "something was written or the input changed"
    return err


def versioned(graph: onnx.GraphProto) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET_CF)], producer_name="spa-tests")
    m.ir_version = IR
    onnx.checker.check_model(m, full_check=True)
    return m


def conv_integer_layers(x: str, n: int, c: int = 3) -> tuple[list, list, str]:
    """Dynamically quantized Conv layers as onnxruntime's quantize_dynamic writes them: DynamicQuantizeLinear ->
    ConvInteger (int8 weight) -> Cast -> Mul by the two scales."""
    nodes, inits, rng = [], [], np.random.default_rng(0)
    for i in range(n):
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (8, c, 3, 3)).astype(np.int8), f"w{i}"),
                  numpy_helper.from_array(np.array(0, np.int8), f"wz{i}"),
                  numpy_helper.from_array(np.array(0.01, np.float32), f"ws{i}")]
        nodes += [helper.make_node("DynamicQuantizeLinear", [x], [f"q{i}", f"s{i}", f"z{i}"]),
                  helper.make_node("ConvInteger", [f"q{i}", f"w{i}", f"z{i}", f"wz{i}"], [f"ci{i}"],
                                   pads=[1, 1, 1, 1], name=f"convint{i}"),
                  helper.make_node("Cast", [f"ci{i}"], [f"cf{i}"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"s{i}", f"ws{i}"], [f"sm{i}"]),
                  helper.make_node("Mul", [f"cf{i}", f"sm{i}"], [f"y{i}"])]
        x, c = f"y{i}", 8
    return nodes, inits, x


def if_with_weights(cond: str, x: str, out: str) -> onnx.NodeProto:
    """An If whose two branches each hold a Conv with its own float weight (the main graph holds none)."""
    def branch(name):
        w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((8, 8, 3, 3)).astype(np.float32), name)
        conv = helper.make_node("Conv", [x, name], [f"{name}_y"], pads=[1, 1, 1, 1])
        return helper.make_graph([conv], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                   [1, 8, 8, 8])], initializer=[w])
    return helper.make_node("If", [cond], [out], then_branch=branch("then_w"), else_branch=branch("else_w"))


def io(name, dims, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def test_conv_integer_layers_are_pruned(tmp_path, capsys):
    """3 ConvInteger layers as quantize_dynamic writes them: their int8 weights are prunable sources
    (operators/quantized.py), cut and kept int8; the last layer's channels are the graph output. (Such a main
    graph crashed with an IndexError in build_groups before the no-atom guard, then was refused as holding no
    prunable weight.)"""
    nodes, inits, y = conv_integer_layers("x", 3)
    m = versioned(helper.make_graph(nodes, "g", [io("x", [1, 3, 8, 8])], [io(y, [1, 8, 8, 8])], initializer=inits))
    src = save(m, tmp_path / "in.onnx")
    rc, _, err = run_cli([src, tmp_path / "o.onnx", "--ratio", "0.5", "--fast"], capsys)
    assert rc == 0, err
    pruned = {t.name: t for t in onnx.load(tmp_path / "o.onnx").graph.initializer}
    assert [tuple(pruned[f"w{i}"].dims) for i in range(3)] == [(4, 3, 3, 3), (4, 4, 3, 3), (8, 4, 3, 3)]
    assert pruned["w0"].data_type == TensorProto.INT8


def test_weights_only_inside_an_if_are_not_called_no_weights(tmp_path, capsys):
    """No float tensor at all in the main graph: the early check used to say 'no floating-point weights'; the
    branches' convs are found (their output is the graph's, so frozen)."""
    m = versioned(helper.make_graph([if_with_weights("flag", "x", "out")], "g",
                                    [io("x", [1, 8, 8, 8]), io("flag", [], TensorProto.BOOL)],
                                    [io("out", [1, 8, 8, 8])]))
    err = refused(tmp_path, capsys, m, "no prunable group: every group is frozen", "graph output 'out'")
    assert "no floating-point weights" not in err


def test_weights_only_inside_an_if_prune(tmp_path, capsys):
    """Two convs in each branch (weights only there): the hidden width of each branch prunes, both branches are
    verified (each If condition forced true and false), and the result runs either way."""
    def branch(tag):
        rng = np.random.default_rng(len(tag))
        w1 = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), f"{tag}_w1")
        w2 = numpy_helper.from_array(rng.standard_normal((8, 16, 3, 3)).astype(np.float32), f"{tag}_w2")
        nodes = [helper.make_node("Conv", ["x", f"{tag}_w1"], [f"{tag}_h"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", [f"{tag}_h"], [f"{tag}_r"]),
                 helper.make_node("Conv", [f"{tag}_r", f"{tag}_w2"], [f"{tag}_y"], pads=[1, 1, 1, 1])]
        return helper.make_graph(nodes, tag, [], [io(f"{tag}_y", [1, 8, 8, 8])], initializer=[w1, w2])
    m = versioned(helper.make_graph(
        [helper.make_node("If", ["flag"], ["out"], then_branch=branch("then"), else_branch=branch("else"))], "g",
        [io("x", [1, 8, 8, 8]), io("flag", [], TensorProto.BOOL)], [io("out", [1, 8, 8, 8])]))
    src, out = save(m, tmp_path / "in.onnx"), tmp_path / "out.onnx"
    rc, _, err = run_cli([src, out, "--fast", "--ratio", "0.5", "--report", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["groups"]["pruned"] == 2 and rep["verification"]["if_conditions_forced"] == [True, False]
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 8)).astype(np.float32)
    for flag in (True, False):
        assert run_model(pruned, {"x": x, "flag": np.array(flag)})[0].shape == (1, 8, 8, 8)


def test_a_qdq_weight_is_a_source(tmp_path, capsys):
    """A QDQ model: the Conv's weight is DequantizeLinear(int8 constant), a prunable source (spa/quant.py); its
    one group is frozen only because it is the graph output."""
    w = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.int8), "w_q")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "w_scale")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["out"], pads=[1, 1, 1, 1])]
    m = versioned(helper.make_graph(nodes, "g", [io("x", [1, 3, 8, 8])], [io("out", [1, 8, 8, 8])],
                                    initializer=[w, scale]))
    refused(tmp_path, capsys, m, "every group is frozen", "reaches a graph output")


def test_a_model_without_weights_still_says_so(tmp_path, capsys):
    m = versioned(helper.make_graph([helper.make_node("Relu", ["x"], ["out"])], "g", [io("x", [1, 3])],
                                    [io("out", [1, 3])]))
    refused(tmp_path, capsys, m, "model has no floating-point weights")


# ---- a dim declared -1 is dynamic: --input-shape may pin it -------------------------------------------------------
def paddle_cls() -> onnx.ModelProto:
    """PaddleOCR's direction classifier declares its input (-1, 3, ?, ?) and its output (-1, 4)."""
    m = cnn()
    set_dims(m.graph.input[0], [-1, 3, "?", "?"])
    set_dims(m.graph.output[0], [-1, 4])
    return m


def test_input_shape_pins_a_dim_declared_minus_one(tmp_path, capsys):
    src, out = save(paddle_cls(), tmp_path / "cls.onnx"), tmp_path / "out.onnx"
    rc, _, err = run_cli([src, out, "--fast", "--ratio", "0.5", "--input-shape", "x=1,3,48,192",
                          "--report", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["input_shapes"] == {"x": [1, 3, 48, 192]}
    assert rep["verification"]["status"] == "passed" and rep["groups"]["pruned"] == 2
    pruned = onnx.load(str(out))
    x = np.random.default_rng(0).standard_normal((3, 3, 48, 192)).astype(np.float32)  # any batch, any size
    assert run_model(pruned, {"x": x})[0].shape == (3, 4)


def test_minus_one_without_input_shape_takes_the_default_sizes(tmp_path, capsys):
    """The declared -1 in the output is no size either (it used to fail as 'negative dim in [-1, 4]')."""
    src = save(paddle_cls(), tmp_path / "cls.onnx")
    rc, _, err = run_cli([src, tmp_path / "out.onnx", "--fast", "--ratio", "0.5", "--report", tmp_path / "r.json"],
                         capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["input_shapes"] == {"x": [1, 3, 224, 224]}


def test_input_shape_still_refuses_a_static_dim_it_contradicts(tmp_path, capsys):
    src, out = save(paddle_cls(), tmp_path / "cls.onnx"), tmp_path / "out.onnx"
    rc, _, err = run_cli([src, out, "--ratio", "0.5", "--input-shape", "x=1,4,48,192"], capsys)
    assert_one_line_error(rc, err, "--input-shape x=1,4,48,192 does not match the declared shape ('?', 3, '?', '?')")
    assert not out.exists()


# ---- verification inputs: the second draw doubles the batch, and only the batch ----------------------------------
def prune_report(tmp_path, capsys, model, *extra) -> tuple[dict, str]:
    src, out = save(model, tmp_path / "in.onnx"), tmp_path / "out.onnx"
    rc, _, err = run_cli([src, out, "--fast", "--ratio", "0.5", "--report", tmp_path / "r.json", *extra], capsys)
    assert rc == 0, err
    assert out.exists()
    return json.loads((tmp_path / "r.json").read_text()), err


def test_a_batch_baked_into_a_reshape_falls_back_with_a_warning(tmp_path, capsys):
    """x.view(1, -1) exported with batch 1 baked in: the original cannot run at batch 2, so the second draw uses
    the given shapes, and the report and the summary say so."""
    rep, err = prune_report(tmp_path, capsys, cnn(reshape_batch=1))
    v = rep["verification"]
    assert v["status"] == "passed" and v["inputs"] == 2 and rep["groups"]["pruned"] >= 1
    assert v["input_shapes"] == [{"x": [1, 3, 8, 8]}, {"x": [1, 3, 8, 8]}]
    warning = [w for w in rep["warnings"] if "doubled batch" in w]
    assert len(warning) == 1 and "x=2x3x8x8" in warning[0] and "used the given shapes" in warning[0]
    assert "doubled batch" in err  # the summary shows it


def test_a_batch_the_model_takes_is_doubled_without_a_warning(tmp_path, capsys):
    rep, _ = prune_report(tmp_path, capsys, cnn())
    assert rep["verification"]["input_shapes"] == [{"x": [1, 3, 8, 8]}, {"x": [2, 3, 8, 8]}]
    assert not [w for w in rep["warnings"] if "doubled batch" in w]


def test_input_shape_pins_the_batch_of_the_second_draw(tmp_path, capsys):
    """--input-shape fixes every dim it names: the second draw keeps them (no doubling, so no fallback either)."""
    rep, _ = prune_report(tmp_path, capsys, cnn(reshape_batch=1), "--input-shape", "x=1,3,8,8")
    assert rep["verification"]["input_shapes"] == [{"x": [1, 3, 8, 8]}, {"x": [1, 3, 8, 8]}]
    assert not [w for w in rep["warnings"] if "doubled batch" in w]


def shared_batch_model() -> onnx.ModelProto:
    """Three inputs: x [B, 3, 8, 8], a recurrent-style state [2, B, 6] holding the same named batch at dim 1
    (silero-vad's `state`), and a gain [1] without it. The state's batch rows are concatenated to the conv
    features, so a batch that differs between x and state cannot run."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    state = b.input("state", [2, 1, 6])
    gain = b.input("gain", [1])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.relu(b.conv("c2", y, 8, 8))
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])])                       # [B, 8]
    s = b.op("Flatten", [b.op("Transpose", [state], perm=[1, 0, 2])])            # [B, 12]
    y = b.op("Concat", [y, b.op("Mul", [s, gain])], axis=1)                      # [B, 20]
    b.output(b.gemm("fc", y, 20, 4))
    m = b.model()
    set_dims(m.graph.input[0], ["batch", 3, 8, 8])
    set_dims(m.graph.input[1], [2, "batch", 6])
    set_dims(m.graph.output[0], ["batch", 4])
    return m


def test_a_named_batch_is_doubled_wherever_it_appears(tmp_path, capsys):
    rep, _ = prune_report(tmp_path, capsys, shared_batch_model())
    assert rep["verification"]["input_shapes"][1] == {"x": [2, 3, 8, 8], "state": [2, 2, 6], "gain": [1]}
    assert not [w for w in rep["warnings"] if "doubled batch" in w]
    assert rep["groups"]["pruned"] >= 1


def test_a_name_pinned_in_one_input_keeps_its_size_in_all(tmp_path, capsys):
    rep, _ = prune_report(tmp_path, capsys, shared_batch_model(), "--input-shape", "state=2,1,6")
    assert rep["verification"]["input_shapes"][1] == {"x": [1, 3, 8, 8], "state": [2, 1, 6], "gain": [1]}
    assert not [w for w in rep["warnings"] if "doubled batch" in w]


def test_the_first_draw_still_refuses_a_model_that_does_not_run():
    """The fallback is for the doubled batch only: a model that fails at the given shapes is still refused."""
    m = cnn(reshape_batch=1)
    assert "warnings" in verify.compare(m, m, {"x": (1, 3, 8, 8)})
    with pytest.raises(SpaError, match="does not run in onnxruntime with inputs x=2x3x8x8"):
        verify.compare(m, m, {"x": (2, 3, 8, 8)})


# ---- past protobuf's 2 GB: the full check runs by path ------------------------------------------------------------
@pytest.fixture
def checker_calls(monkeypatch):
    """What onnx.checker.check_model was given, in order (a path, or the in-memory model)."""
    calls, real = [], onnx.checker.check_model

    def spy(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    return calls


def test_a_model_past_the_limit_is_checked_by_path(tmp_path, monkeypatch, checker_calls):
    """EXTERNAL_DATA_BYTES at 0: every model is 'past 2 GB' (and tensors from 256 bytes go external). The pruned
    model is checked by path, verified in onnxruntime sessions that get the large weights as external
    initializers (a model past 2 GB cannot be serialized for a session either), written with its weights in
    OUT.data, and runs."""
    import spa.ir

    monkeypatch.setattr(spa.ir, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(spa.ir, "EXTERNAL_TENSOR_MIN_BYTES", 256)
    src, out = save(cnn(), tmp_path / "in.onnx"), tmp_path / "out.onnx"
    rep = driver.prune(src, str(out), ratio=0.5, fast=True).report
    assert rep["verification"]["status"] == "passed" and rep["groups"]["pruned"] == 2
    assert [c for c in checker_calls if isinstance(c, str)]
    # in memory only normalization's light copy of the input, whose weights are typed inputs (no bytes)
    assert not [c for c in checker_calls if isinstance(c, onnx.ModelProto)
                and any(t.name == "c1.weight" for t in c.graph.initializer)]
    written = onnx.load(str(out), load_external_data=False)
    assert (tmp_path / "out.onnx.data").exists() and onnx.external_data_helper.uses_external_data(
        next(t for t in written.graph.initializer if t.name == "c1.weight"))
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert run_model(onnx.load(str(out)), {"x": x})[0].shape == (2, 4)


def test_the_check_by_path_still_rejects_a_broken_model(monkeypatch):
    import spa.ir

    monkeypatch.setattr(spa.ir, "EXTERNAL_DATA_BYTES", 0)
    m = cnn()
    fc = next(t for t in m.graph.initializer if t.name == "fc.weight")
    bad = numpy_helper.from_array(np.zeros((4, 7), np.float32), "fc.weight")  # Gemm needs 8 rows (transB: [4, 8])
    fc.CopyFrom(bad)
    with pytest.raises(VerificationError, match="onnx.checker rejected the pruned model: .*fc"):
        verify.check(m)


def test_a_model_that_refers_to_external_data_is_checked_by_path(tmp_path, checker_calls):
    """Initializers that refer to a data file (loaded without it) cannot be checked in memory; by path they are,
    without reading their bytes."""
    onnx.save_model(cnn(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data",
                    size_threshold=1024)
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    (tmp_path / "m.data").unlink()  # the check does not need it
    verify.check(m)
    assert [c for c in checker_calls if isinstance(c, str)]


# ---- a node name used twice (silero-vad's OpenVINO export: 15 nodes named 'F0::anon') -----------------------------
def test_a_node_name_used_twice_is_renamed_not_refused(tmp_path, capsys):
    """Node names are diagnostic only (onnx.checker takes duplicates, onnxruntime among Constant nodes, which it
    turns into initializers first); normalization gives the later ones fresh names, since --exclude, plans and
    the search key nodes by name. The pruned model matches the original at ratio 0 and prunes at 0.5."""
    m = cnn()
    consts = [helper.make_node("Constant", [], [t.name], value=t, name="F0::anon") for t in m.graph.initializer]
    del m.graph.initializer[:]   # every weight a Constant node of that one name, as in the OpenVINO export
    nodes = consts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    src = save(m, tmp_path / "in.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    same = tmp_path / "same.onnx"
    driver.prune(src, str(same), ratio=0.0, fast=True)
    np.testing.assert_allclose(run_model(onnx.load(str(same)), {"x": x})[0], run_model(m, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)
    rep, _ = prune_report(tmp_path, capsys, m)
    assert rep["verification"]["status"] == "passed" and rep["groups"]["pruned"] == 2
    assert rep["normalize"]["names_renamed"] == len(consts) - 1 > 0
    assert rep["macs"]["after"] < rep["macs"]["before"]


def test_an_opset_9_flatten_of_a_shape_slice_is_read(tmp_path, capsys):
    """TorchScript at opset 9 writes `x.flatten(2)` as Shape -> Slice with starts/ends attributes (inputs only
    from opset 10) -> Concat [.., -1] -> Reshape. Its picked dims are read like the input form: the conv before
    it prunes and verifies (the Slice's attributes were not read: the Reshape froze every channel with 'reshape
    with unknown static shapes', exit 2)."""
    b = Builder(opset=9)
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    dims = b.op("Slice", [b.op("Shape", [y])], starts=[0], ends=[2], axes=[0])
    flat = b.op("Reshape", [y, b.op("Concat", [dims, b.i64("rest", [-1])], axis=0)])    # [1, 8, 64]
    tokens = b.op("Transpose", [flat], perm=[0, 2, 1])                                   # [1, 64, 8]
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    b.output(b.op("MatMul", [tokens, b.const("proj", w)]))
    m = b.model()
    m.ir_version = 4
    src = tmp_path / "op9.onnx"
    onnx.save(m, str(src))
    rc, out, err = run_cli([src, tmp_path / "o.onnx", "--ratio", "0.5", "--fast", "--report", tmp_path / "r.json"],
                           capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verification"]["status"] == "passed"
    pruned = {t.name: t for t in onnx.load(tmp_path / "o.onnx").graph.initializer}
    assert tuple(pruned["c1.weight"].dims) == (4, 3, 3, 3) and tuple(pruned["proj"].dims) == (4, 4)


def shared_targets_net() -> onnx.ModelProto:
    """Three conv branches, each flattened to [1, 8, 16] and back to [1, 8, 4, 4] by Reshapes that all read the
    same two shape constants (onnxruntime's offline optimizer shares equal constants like this), then summed."""
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    flat, back = b.i64("flat", [1, 8, 16]), b.i64("back", [1, 8, 4, 4])
    outs = []
    for k in range(3):
        y = b.relu(b.conv(f"c{k}", x, 3, 8))
        y = b.op("Reshape", [b.op("Reshape", [y, flat]), back])
        outs.append(b.conv(f"d{k}", y, 8, 2))
    b.output(b.op("Sum", outs))
    return b.model()


def test_uses_of_a_shared_shape_constant_that_still_agree_keep_sharing(tmp_path):
    """Each Reshape's target is rewritten for its branch's kept channels: the two pruned branches (8 -> 4) get one
    new constant per original, read by both, and the branch left whole keeps reading the originals (one copy per
    Reshape made onnxruntime's MatMulAddFusion fail to load an optimized BERT: 'Attempt to replace the existing
    tensor')."""
    res = driver.prune(shared_targets_net(), str(tmp_path / "o.onnx"), ratio=0.5, fast=True, exclude=("c2",))
    assert res.report["verification"]["status"] == "passed"
    m = onnx.load(tmp_path / "o.onnx")
    values = {t.name: numpy_helper.to_array(t).tolist() for t in m.graph.initializer if t.data_type == TensorProto.INT64}
    readers = {}
    for n in m.graph.node:
        if n.op_type == "Reshape":
            readers.setdefault(n.input[1], []).append(n.input[0])
    assert sorted(values.values()) == [[1, 4, 4, 4], [1, 4, 16], [1, 8, 4, 4], [1, 8, 16]]
    assert sorted(len(r) for r in readers.values()) == [1, 1, 2, 2]
    assert values.get("flat") == [1, 8, 16] and len(readers["flat"]) == 1     # the whole branch: the original


def transposed_matmul(b, x, rows: int, cols: int, name: str) -> str:
    """com.microsoft FusedMatMul with transB=1: onnxruntime runs it; normalization does not write this form back
    as standard ops (tests/test_unfuse.py), torch has no lowering of it, ONNX no shape inference."""
    b.extra_opsets["com.microsoft"] = 1
    w = np.random.default_rng(4).standard_normal((rows, cols)).astype(np.float32)
    return b.op("FusedMatMul", [x, b.const(name, w)], domain="com.microsoft", transB=1)


def contrib_tail_net() -> onnx.ModelProto:
    """Conv -> ReLU -> Conv -> a contrib op that ends the graph: the first conv's channels prune."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.conv("c2", b.relu(b.conv("c1", x, 3, 8)), 8, 4)
    b.output(transposed_matmul(b, y, 8, 8, "tail"))
    return b.model()


def test_an_operator_without_a_torch_lowering_makes_the_default_prune_as_fast(tmp_path, capsys):
    """The data passes cannot run a node torch has no lowering for: the plain command prunes as --fast does and
    says why in its first warning (it stopped with 'no torch lowering' in the middle of the synthesis)."""
    src = tmp_path / "m.onnx"
    onnx.save(contrib_tail_net(), str(src))
    rc, out, err = run_cli([src, tmp_path / "o.onnx", "--ratio", "0.5", "--report", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verification"]["status"] == "passed" and rep["importance"]["criterion"] == "l2"
    assert "no torch lowering for op com.microsoft::FusedMatMul" in rep["warnings"][0]
    assert "as --fast does" in rep["warnings"][0]
    assert tuple({t.name: t for t in onnx.load(tmp_path / "o.onnx").graph.initializer}["c1.weight"].dims) == \
        (4, 3, 3, 3)
    rc, _, err = run_cli([src, tmp_path / "asked.onnx", "--ratio", "0.5", "--importance", "obspa"], capsys)
    assert_one_line_error(rc, err, "no torch lowering for op com.microsoft::FusedMatMul", "add --fast")


def test_contrib_ops_left_fused_get_the_advice_to_prune_the_export(tmp_path, capsys):
    """A contrib op normalization does not write back (no rule here, no ONNX shape inference) freezes what it
    touches: with nothing prunable the one line says to prune the model as exported; with MACs it cannot count,
    the warning says so too."""
    src = tmp_path / "m.onnx"
    b = Builder()
    y = b.relu(transposed_matmul(b, b.input("x", [1, 8]), 16, 8, "head"))
    b.output(b.gemm("fc", y, 16, 4))
    onnx.save(b.model(), str(src))
    rc, _, err = run_cli([src, tmp_path / "o.onnx", "--ratio", "0.5", "--fast"], capsys)
    assert_one_line_error(rc, err, "no prunable group", "onnxruntime contrib ops (FusedMatMul)",
                          "prune the model as exported")
    b = Builder()   # a contrib op in front of prunable convs: their shapes, so their MACs, are unknown
    y = transposed_matmul(b, b.relu(b.conv("c1", b.input("x", [1, 3, 8, 8]), 3, 8)), 8, 8, "mix")
    b.output(b.conv("c3", b.relu(b.conv("c2", y, 8, 8)), 8, 4))
    onnx.save(b.model(), str(src))
    rc, out, err = run_cli([src, tmp_path / "o.onnx", "--target-flops", "0.5", "--fast"], capsys)
    assert rc == 0, err
    assert "MAC-carrying nodes are unknown" in err and "contrib ops (FusedMatMul)" in err, err
