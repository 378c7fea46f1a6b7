"""The pattern search (spa.search.sculpt): exact MACs of an assignment, end-to-end searches, the learned alpha."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from helpers import Builder

pytest.importorskip("torch")
pytest.importorskip("gymnasium")

from spa import driver, patterns  # noqa: E402
from spa.calib import Calib  # noqa: E402
from spa.cli import main  # noqa: E402
from spa.errors import SpaError  # noqa: E402
from spa.search.ppo_gnn import adapt_alpha  # noqa: E402
from spa.search.problem import SearchProblem  # noqa: E402
from spa.search.sculpt import LEVELS, PatternSpace, prune_with_patterns, search_patterns  # noqa: E402


def net():
    """Two 3x3 convs (a residual block around the second), a depthwise 3x3, a 1x1 and a 5x5 conv, classifier."""
    b = Builder()
    x = b.input("x", [1, 3, 10, 10])
    y = b.relu(b.conv("c1", x, 3, 8))
    z = b.relu(b.conv("c2", y, 8, 8))
    y = b.op("Add", [y, z])
    y = b.relu(b.conv("dw", y, 8, 8, group=8))
    y = b.relu(b.conv("pw", y, 8, 8, k=1))
    y = b.relu(b.conv("c5", y, 8, 6, k=5))
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    b.output(b.gemm("fc", y, 6, 4, trans_b=1))
    return b.model()


def calib(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return Calib({"x": rng.standard_normal((n, 3, 10, 10)).astype(np.float32)}, None, "test")


@pytest.fixture(scope="module")
def problem():
    return SearchProblem.build(net(), target_flops=1.0, calib=calib())


@pytest.mark.parametrize("target", [0.9, 0.5, 0.3, 0.15])
def test_assignment_macs_are_exact_and_at_the_budget(problem, target):
    space = PatternSpace(problem, target)
    assert [lay.name for lay in space.layers] == ["c1", "c2", "dw", "c5"]     # the 1x1 stays out
    rng = np.random.default_rng(0)
    for draw in range(12):
        levels = rng.integers(0, len(LEVELS), len(space.layers)) if draw else np.full(len(space.layers), 6)
        a = space.assign(levels)
        model = problem.clone()
        layers = patterns.apply_patterns(model.graph, patterns.LARGEST_PATTERN, per_layer=a.per_layer(space))
        patterns.check_patterns(model.graph, layers)
        sec = patterns.report_section(model.graph, layers, 1, 0.0, space.total, space.total)
        assert sec["macs"]["pattern_aware"] == a.macs
        kept = {name: int(lp.mask.sum()) for name, lp in layers.items()}
        for lay, k, e in zip(space.layers, a.k, a.empty):                     # K per kernel, e kernels emptied
            assert kept.get(lay.name, lay.kernels * lay.n) == (lay.kernels - e) * k
        if a.feasible:
            assert a.macs <= space.budget
            # maximal: no emptied kernel can come back within the budget
            assert all(e == 0 or a.macs + lay.positions * k > space.budget
                       for lay, k, e in zip(space.layers, a.k, a.empty))


def test_uniform_dense_level_uses_connectivity_only(problem):
    space = PatternSpace(problem, 0.5)
    a = space.assign([LEVELS.index(None)] * len(space.layers))
    assert list(a.k) == [lay.n for lay in space.layers]
    share = a.empty / np.array([lay.kernels for lay in space.layers])
    assert share.max() - share.min() <= 1.0 / min(lay.kernels for lay in space.layers) + 1e-9
    assert a.macs <= space.budget


@pytest.mark.parametrize("policy", ["ppo-gnn", "uniform", "random"])
def test_short_search_writes_a_valid_pattern_pruned_model(tmp_path, policy):
    model = net()
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    c = calib()
    options = {"batch": 3, "warm": 2, "epochs": 2} if policy == "ppo-gnn" else None
    assignment, h = search_patterns(str(src), target_flops=0.4, policy=policy, calib=c, evals=8, metric="kl",
                                    policy_options=options)
    assert h.meta["evaluations"] == (7 if policy == "uniform" else 8)
    assert [r[2] for r in h.rows] == list(np.maximum.accumulate([r[1] for r in h.rows]))
    assert h.meta["pattern_aware_ratio"] <= 0.4
    rep = prune_with_patterns(str(src), str(out), assignment, calib=c).report
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert rep["patterns"]["macs"]["pattern_aware"] == h.meta["pattern_aware_macs"]
    assert {n: v["k"] for n, v in rep["patterns"]["assignment"].items()} == \
        {n: min(v["k"], 25 if n == "c5" else 9) for n, v in h.meta["assignment"].items()
         if v["k"] < (25 if n == "c5" else 9) or v["kernels_emptied"]}
    if policy == "ppo-gnn":
        assert len(h.meta["alpha"]) >= 1 and all(a > 0 for a in h.meta["alpha"])


def test_alpha_moves_geometrically_towards_the_share_of_the_quality_spread():
    q, s = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.70, 0.71, 0.72, 0.73])
    goal = 0.1 * q.std() / s.std()
    a1 = adapt_alpha(0.0, q, s, 0.1, 0.5)                        # from 0: starts at 1e-3 of the goal
    assert a1 == pytest.approx(goal * math.sqrt(1e-3))
    a2 = adapt_alpha(a1, q, s, 0.1, 0.5)
    assert a2 == pytest.approx(math.sqrt(a1 * goal))
    a = a2
    for _ in range(40):
        a = adapt_alpha(a, q, s, 0.1, 0.5)
    assert a == pytest.approx(goal, rel=1e-6)
    assert adapt_alpha(0.3, q, np.full(4, 0.7), 0.1, 0.5) == 0.3      # no FLOPs spread: unchanged


def test_errors_are_one_line(problem):
    with pytest.raises(SpaError, match="unknown pattern-search policy"):
        search_patterns(net(), target_flops=0.5, policy="nope", calib=calib())
    with pytest.raises(SpaError, match="target-flops"):
        PatternSpace(problem, 1.5)
    with pytest.raises(SpaError, match="K of 'c1'"):
        driver.prune(net(), None, patterns=24, pattern_assignment={"c1": (0, 0.0)})


def test_cli_patterns_search(tmp_path, capsys):
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(net(), src)
    cal = tmp_path / "calib.npz"
    np.savez(cal, x=calib().inputs["x"])
    rc = main(["prune", str(src), str(out), "--patterns-search", "random", "--target-flops", "0.4", "--evals", "3",
               "--calib", str(cal), "--report", str(report), "--quiet"])
    assert rc == 0
    rep = json.loads(report.read_text())
    assert rep["pattern_search"]["policy"] == "random" and rep["pattern_search"]["evaluations"] == 3
    assert rep["patterns"]["macs"]["pattern_aware_ratio"] <= 0.4
    onnx.checker.check_model(onnx.load(out), full_check=True)
