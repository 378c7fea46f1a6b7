"""--fold-constants: folds the constant a removed channel carries into consumer biases, changes only values, and
reports fidelity to the original."""
from __future__ import annotations

import json

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from spa import driver
from spa.passes import verify


def bn_chain(beta0: float = 0.7):
    """conv3x3 -> BN -> Relu -> conv1x1(+bias) -> out. Channel 0 of the first conv has zero weights and bias, so
    after BN and Relu it carries the constant relu(beta0) into the 1x1 conv: removing it and folding that constant
    into the 1x1 conv's bias reproduces the original exactly."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w1[0], b1[0] = 0, 0
    scale, beta = np.ones(6, np.float32), rng.standard_normal(6).astype(np.float32) * 0.1
    beta[0] = beta0
    mean, var = np.zeros(6, np.float32), np.ones(6, np.float32)
    w2 = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w1, "w1"), (b1, "b1"), (scale, "s"), (beta, "beta"), (mean, "m"), (var, "v"), (w2, "w2"), (b2, "b2")]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "beta", "m", "v"], ["n"], name="bn", epsilon=0.0),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def plan_removing_channel0(model, tmp_path):
    analysis = driver.analyse(driver.load(model))
    group = next(g for g in analysis.groups if "c1" in g.sources)
    plan = {"format": "spa-prune-plan/1",
            "groups": [{"id": group.id, "name": group.name, "units": group.size, "removed": [0]}]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def test_fold_constants_restores_a_constant_channel_exactly(tmp_path):
    m = bn_chain()
    plan = plan_removing_channel0(m, tmp_path)
    plain = driver.prune(m, None, plan_file=plan).report
    res = driver.prune(m, None, plan_file=plan, fold_constants=True)
    comp = res.report["compensation"]
    assert comp["folded_sinks"] == 1
    assert plain["compensation"] is None
    assert comp["fidelity_before"]["y"]["rel_l2"] > 1e-3  # the constant mattered
    assert comp["fidelity_after"]["y"]["rel_l2"] < 1e-6   # and folding it restores the original
    feeds = verify.random_inputs(m, {"x": (1, 3, 8, 8)}, seed=7)
    a = verify.run(m, feeds)[0]
    b = verify.run(res.model.graph.to_model(), feeds)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fold_constants_changes_values_only(tmp_path):
    m = bn_chain()
    plan = plan_removing_channel0(m, tmp_path)
    plain = driver.prune(m, None, plan_file=plan, fast=True).model.graph.to_model()
    folded = driver.prune(m, None, plan_file=plan, fold_constants=True, fast=True).model.graph.to_model()
    assert [(n.op_type, list(n.input)) for n in plain.graph.node] == [(n.op_type, list(n.input)) for n in folded.graph.node]
    shapes = lambda mm: {t.name: tuple(t.dims) for t in mm.graph.initializer}
    assert shapes(plain) == shapes(folded)
    changed = [t.name for t, u in zip(plain.graph.initializer, folded.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))]
    assert changed == ["b2"]


def test_fold_constants_on_zoo_models_reports_fidelity():
    import pytest
    models = pytest.importorskip("spa.models")
    for name in ("mobilenet_v2", "densenet121"):
        rep = driver.prune(str(models.zoo_path(name, small=True)), None, ratio=0.3, fold_constants=True).report
        comp = rep["compensation"]
        assert comp["folded_sinks"] > 0
        assert comp["fidelity_after"]["output"]["rel_l2"] < comp["fidelity_before"]["output"]["rel_l2"]
