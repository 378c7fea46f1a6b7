"""Every zoo architecture x both torch exporters: identity at ratio 0, verified pruning at 0.3 and 0.5, and MACs
checked against counts that do not come from our cost model.

Default run: small variants (same topology, reduced width and input). `pytest -m slow` runs the full-size sweep.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

models = pytest.importorskip("spa.models")
from spa import driver
from spa.models.counting import torch_macs_params
from spa.passes import verify

EXPORTERS = [False, True]


def independent_macs(model: onnx.ModelProto) -> int:
    """MACs of Conv/ConvTranspose/Gemm/MatMul read off the pruned file itself (onnx shape inference + weight
    shapes), written here from the definition in DESIGN.md, without any of spa's labelling or cost code."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    total = 0
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv":
            w = shapes[n.input[1]]
            total += math.prod(shapes[n.output[0]]) * w[1] * math.prod(w[2:])
        elif n.op_type == "ConvTranspose":
            w = shapes[n.input[1]]
            total += math.prod(shapes[n.input[0]]) * w[1] * math.prod(w[2:])
        elif n.op_type == "Gemm":
            a = shapes[n.input[0]]
            total += math.prod(shapes[n.output[0]]) * (a[0] if attrs.get("transA", 0) else a[1])
        elif n.op_type == "MatMul":
            total += math.prod(shapes[n.output[0]]) * shapes[n.input[0]][-1]
    return total


def _run(path, ratio, tmp_path):
    out = tmp_path / f"pruned_{ratio}.onnx"
    # the structural cut on every architecture (--fast: the data passes are covered by test_zoo_criteria)
    res = driver.prune(str(path), str(out), ratio=ratio, fast=True)  # raises unless checker + verification pass
    return res.report, onnx.load(str(out))


def _check_zoo(name, dynamo, small, tmp_path):
    path = models.zoo_path(name, dynamo=dynamo, small=small)
    original = onnx.load(str(path))
    torch_macs, torch_params = torch_macs_params(models.build(name, small=small),
                                                 models.example_inputs(name, small=small))

    rep0, same = _run(path, 0.0, tmp_path)
    assert rep0["macs"]["before"] == torch_macs, "cost model disagrees with the torch-hook count"
    assert rep0["macs"]["after"] == rep0["macs"]["before"]
    assert rep0["params"]["after"] == rep0["params"]["before"]
    feeds = verify.random_inputs(original, rep0_shapes(rep0), seed=3)
    for a, b in zip(verify.run(original, feeds), verify.run(same, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(a).max())))
    # parameters = float weights of the written (normalized, unpruned) file, counted here independently
    file_params = sum(math.prod(t.dims) for t in same.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert rep0["params"]["before"] == file_params
    assert file_params >= torch_params * 0.95  # BN statistics may be folded (dynamo), weights are all there

    for ratio in (0.3, 0.5):
        rep, pruned = _run(path, ratio, tmp_path)
        assert rep["verification"]["status"] == "passed"
        assert rep["macs"]["after"] == independent_macs(pruned)
        assert rep["macs"]["after"] < rep["macs"]["before"]
        assert rep["params"]["after"] < rep["params"]["before"]
        for row in rep["per_group"]:
            n, frozen = row["units"], row["frozen_units"]
            if frozen == 0 and n > 1:
                # units are given back only where a tensor (a concat piece) would lose every position
                assert row["kept"] == max(n - math.floor(ratio * n + 0.5), 1) + row["given_back"], row
        assert [o.name for o in pruned.graph.output] == [o.name for o in original.graph.output]
        assert [i.name for i in pruned.graph.input] == [i.name for i in original.graph.input]


def rep0_shapes(rep):
    return {k: tuple(v) for k, v in rep["input_shapes"].items()}


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_zoo_small(name, dynamo, tmp_path):
    _check_zoo(name, dynamo, True, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", EXPORTERS, ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_zoo_full(name, dynamo, tmp_path):
    _check_zoo(name, dynamo, False, tmp_path)


def test_vgg_macs_fall_as_the_analytic_formula_says(tmp_path):
    """VGG-16-BN small: every conv's in/out widths are known, so pruned MACs follow from the kept widths."""
    import torch

    model = models.build("vgg16_bn", small=True)
    x = models.example_inputs("vgg16_bn", small=True)[0]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    sizes = []
    hooks = [c.register_forward_hook(lambda m, i, o: sizes.append(o.shape[2] * o.shape[3])) for c in convs]
    model(x)
    for h in hooks:
        h.remove()
    kept = lambda n: n - math.floor(0.5 * n + 0.5)
    expected, cin = 0, 3
    for conv, hw in zip(convs, sizes):
        cout = kept(conv.out_channels)
        expected += hw * cout * cin * 9
        cin = cout
    path = models.zoo_path("vgg16_bn", dynamo=False, small=True)
    rep, _ = _run(path, 0.5, tmp_path)
    conv_macs_before = sum(hw * c.out_channels * c.in_channels * 9 for c, hw in zip(convs, sizes))
    linear_before = rep["macs"]["before"] - conv_macs_before
    assert linear_before > 0
    # the classifier: hidden Linear widths halve too, the last layer's outputs are the graph output
    expected_linear, fin = 0, None
    spatial = linears[0].in_features // convs[-1].out_channels
    fin = kept(convs[-1].out_channels) * spatial
    for i, lin in enumerate(linears):
        fout = lin.out_features if i == len(linears) - 1 else kept(lin.out_features)
        expected_linear += fin * fout
        fin = fout
    assert rep["macs"]["after"] == expected + expected_linear


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_zoo_random_plans_verify(name, dynamo, tmp_path):
    """Arbitrary (not lowest-score) removals in every group: index bookkeeping must hold for any choice."""
    import json

    from helpers import random_plan

    path = str(models.zoo_path(name, dynamo=dynamo, small=True))
    analysis = driver.analyse(driver.load(path))
    plan = random_plan(analysis, np.random.default_rng(sum(map(ord, name)) + dynamo))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan.to_json(analysis)))
    rep = driver.prune(path, None, plan_file=str(plan_file), fast=True).report
    assert rep["verification"]["status"] == "passed"
