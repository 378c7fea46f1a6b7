"""Verification must catch wrong bookkeeping: inject bugs into Apply and expect exit-1 errors, never a model."""
from __future__ import annotations

import numpy as np
import pytest

import spa.passes.apply as apply_mod
from spa import driver
from spa.errors import SpaError, VerificationError

models = pytest.importorskip("spa.models")


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "vit_tiny"])
def test_shifted_slices_are_caught(name, monkeypatch, tmp_path):
    """Cut the kept positions one place off (a concat-offset style bug): outputs differ from the reference."""
    real_cut = apply_mod.cut

    def shifted(array, slices):
        return real_cut(array, [(axis, np.roll(mask, 1)) for axis, mask in slices])

    monkeypatch.setattr(apply_mod, "cut", shifted)
    out = tmp_path / "out.onnx"
    with pytest.raises(VerificationError):
        driver.prune(str(models.zoo_path(name, small=True)), str(out), ratio=0.5)
    assert not out.exists()


def test_wrong_shape_rewrite_is_caught(monkeypatch, tmp_path):
    """A Reshape/Split/Slice rewrite with an off-by-one count: checker or runtime rejects it."""
    monkeypatch.setattr(apply_mod.ApplyContext, "kept", lambda self, atoms: int(self.keep(atoms).sum()) + 1)
    out = tmp_path / "out.onnx"
    with pytest.raises(VerificationError):
        driver.prune(str(models.zoo_path("vit_tiny", small=True)), str(out), ratio=0.5)
    assert not out.exists()


def test_reference_zeroing_is_what_makes_it_pass(monkeypatch):
    """Without the sink zeroing the reference is just the original: a pruned model must then fail."""
    from spa.passes import verify

    real = verify.build_reference
    monkeypatch.setattr(verify, "build_reference", lambda original, analysis, removed, idx: real(original, analysis, set(), idx))
    with pytest.raises(VerificationError):
        driver.prune(str(models.zoo_path("resnet18", small=True)), None, ratio=0.5)


def _sigmoid_head(bias: np.ndarray):
    """x (1x4) -> MatMul -> + bias -> 'z' -> Sigmoid -> 'y': with a very negative bias every output is
    saturated near 0 on random inputs, like a detector's probability map on noise."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((4, len(bias)), 0.01, np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["z"]),
         helper.make_node("Sigmoid", ["z"], ["y"])], "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, len(bias)])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias.astype(np.float32), "b")])
    return helper.make_model(g, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shift, passes", [(1e-3, True), (1.0, False)])
def test_a_saturated_output_is_compared_before_its_squashing(shift, passes):
    """A sigmoid output near 0 everywhere: a logit change of 1e-3 (1e-6 of the logits' scale, float rounding
    in a deep net) moves the output by 0.1 % of its own tiny scale. The check then compares the logits; a real
    change of the logits (1e-3 of their scale) still fails."""
    from spa.passes import verify

    bias = np.linspace(-12.0, -1000.0, 64)
    reference, pruned = _sigmoid_head(bias), _sigmoid_head(bias + shift)
    assert verify.squashed_outputs(reference, pruned) == {"y": "z"}
    if passes:
        result = verify.compare(reference, pruned, {"x": (1, 4)})
        assert result["max_rel_error"]["y"] > 1e-4                  # the old check would have refused it
        assert result["checked_before_squashing"]["y"]["tensor"] == "z"
        assert result["checked_before_squashing"]["y"]["max_rel_error"] < 1e-5
        assert len(reference.graph.output) == len(pruned.graph.output) == 1   # the models are left as they were
    else:
        with pytest.raises(VerificationError, match="'y'"):
            verify.compare(reference, pruned, {"x": (1, 4)})


def _mode_switched_model():
    """y = relu(x W1) W2 in the main graph; an If on `mode == 3` passes y on, its else branch gathers column
    mode + 5 of y's 4, which fails at run time for any mode that reaches it: the model only runs with mode 3
    (like silero-vad's sample-rate input)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(5, np.int64), "five"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    then = helper.make_graph([helper.make_node("Identity", ["y"], ["out_t"])], "then", [],
                             [helper.make_tensor_value_info("out_t", TensorProto.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Add", ["mode64", "five"], ["col"]),
                               helper.make_node("Unsqueeze", ["col", "axis0"], ["cols"]),
                               helper.make_node("Gather", ["y", "cols"], ["out_e"], axis=1)], "else", [],
                              [helper.make_tensor_value_info("out_e", TensorProto.FLOAT, [None, None])])
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="mm1"), helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
             helper.make_node("Constant", [], ["three"], value=numpy_helper.from_array(np.array(3, np.int64))),
             helper.make_node("Cast", ["mode"], ["mode64"], to=TensorProto.INT64),
             helper.make_node("Equal", ["mode64", "three"], ["is3"]),
             helper.make_node("If", ["is3"], ["out"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "switch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                                helper.make_tensor_value_info("mode", TensorProto.INT32, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_an_integer_input_the_model_tests_is_drawn_from_the_tested_values(tmp_path):
    """Random integer feeds take the values the model compares the input with (through a Cast), so a model that
    only runs for those values verifies instead of being refused as not runnable."""
    import onnx

    from spa.ir import Graph
    from spa.passes.verify import random_inputs, tested_values

    model = _mode_switched_model()
    assert tested_values(Graph(model), "mode") == [3] and tested_values(Graph(model), "x") == []
    feeds = random_inputs(model, {"x": (1, 4), "mode": ()}, seed=0)
    assert feeds["mode"].dtype == np.int32 and int(feeds["mode"]) == 3
    src = tmp_path / "switch.onnx"
    onnx.save(model, str(src))
    rep = driver.prune(str(src), str(tmp_path / "out.onnx"), ratio=0.5, fast=True).report
    assert rep["verification"]["status"] == "passed" and rep["groups"]["pruned"] == 1


def test_held_out_samples_fall_back_to_the_analysis_batch():
    """An export that declares a dynamic batch but bakes batch 1 into a Reshape cannot run the 16 held-out samples
    as one batch in onnxruntime: they run one at a time, with a warning; a model that fails at batch 1 too is
    still refused."""
    from types import SimpleNamespace

    from onnx import TensorProto, helper, numpy_helper

    from spa.errors import SpaError
    from spa.pipeline import PruneRun

    def model(target):
        w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
        shape = numpy_helper.from_array(np.array(target, np.int64), "target")
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "target"], ["y"])]
        graph = helper.make_graph(nodes, "baked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, shape])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    def run_of(m):
        run = SimpleNamespace(original=m, holdout=[{"x": np.arange(48, dtype=np.float32).reshape(16, 3)}],
                              holdout_reference=None, model=SimpleNamespace(input_shapes={"x": (1, 3)}, warnings=[]))
        run.reference_on_holdout = lambda: PruneRun.reference_on_holdout(run)
        return run

    run = run_of(model([1, 4]))
    PruneRun.settle_holdout(run)
    assert len(run.holdout) == 16 and all(f["x"].shape == (1, 3) for f in run.holdout)
    assert len(run.holdout_reference) == 16 and run.holdout_reference[5][0].shape == (1, 4)
    np.testing.assert_allclose(run.holdout_reference[5][0], np.full((1, 4), 15 + 16 + 17, np.float32))
    assert "does not run in onnxruntime at batch 16: its held-out samples run 1 at a time" in run.model.warnings[0]
    run = run_of(model([1, 5]))  # cannot run at any batch
    with pytest.raises(SpaError, match="does not run in onnxruntime"):
        PruneRun.settle_holdout(run)


def test_inputs_without_a_shared_batch_axis_point_to_fast(tmp_path):
    """A recurrent state laid out [layers, batch, hidden] beside x [batch, features]: the data passes would cut
    it along dim 0, so the plain command refuses in one line naming --fast, and --fast prunes and verifies."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y"]), helper.make_node("Identity", ["state"], ["state_out"])]
    graph = helper.make_graph(nodes, "stateful", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                                  helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, 1, 8])], inits)
    src = tmp_path / "stateful.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    with pytest.raises(SpaError, match=r"do not share a batch on dim 0 \(x: 1, state: 2\).*add --fast"):
        driver.prune(str(src), str(tmp_path / "out.onnx"), target_flops=0.5, importance="obspa")
    assert not (tmp_path / "out.onnx").exists()
    rep = driver.prune(str(src), str(tmp_path / "out.onnx"), target_flops=0.5, fast=True).report
    assert rep["verification"]["status"] == "passed" and rep["groups"]["pruned"] == 1
    rep = driver.prune(str(src), str(tmp_path / "out.onnx"), target_flops=0.5).report   # the default falls back
    assert rep["importance"]["criterion"] == "l2" and rep["groups"]["pruned"] == 1
    assert "do not share a batch on dim 0" in rep["warnings"][0]


@pytest.mark.parametrize("shared", [True, False])
def test_small_draws_share_one_session_per_model_and_large_ones_do_not(shared, monkeypatch):
    """Both draws (the given batch, a doubled one) run in one onnxruntime session per model when their
    activations are small (a session costs a serialization of the model), one session per draw otherwise; the
    checks are the same either way."""
    from spa.passes import verify

    if not shared:
        monkeypatch.setattr(verify, "SHARED_SESSION_BYTES", 0)
    sessions = []
    real = verify.run_many
    monkeypatch.setattr(verify, "run_many", lambda model, draws, *a, **k: sessions.append(len(draws))
                        or real(model, draws, *a, **k))
    rep = driver.prune(str(models.zoo_path("resnet18", small=True)), None, ratio=0.5, fast=True).report
    assert rep["verification"]["status"] == "passed" and rep["verification"]["inputs"] == 2
    verification = sessions[:-2]                              # the fidelity pass's two sessions come last
    assert verification == ([2, 2] if shared else [1, 1, 1, 1])


def test_sessions_take_weights_as_views_not_through_protobuf():
    """run_many's session reads numeric weights as numpy views (only the weightless graph is serialized); a
    weight of a type numpy cannot view (bfloat16) stays in the serialized graph. Outputs equal a session made
    from the whole serialized model."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from spa.passes import verify

    rng = np.random.default_rng(0)
    bias = helper.make_tensor("b", TensorProto.BFLOAT16, [256], vals=rng.integers(0, 2 ** 14, 256).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["y", "bf"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 256])],
        [numpy_helper.from_array(rng.standard_normal((64, 256)).astype(np.float32), "w"), bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    source, borrowed = verify.session_source(model, ort.SessionOptions())
    assert len(source) < 2048 < 64 * 256 * 4 < model.ByteSize()   # the weight did not go through protobuf
    assert len(borrowed) == 2                                       # its OrtValue and the array it views
    x = rng.standard_normal((2, 64)).astype(np.float32)
    got = verify.run(model, {"x": x})[0]
    whole = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(got, whole.run(None, {"x": x})[0])
