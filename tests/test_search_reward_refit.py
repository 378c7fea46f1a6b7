"""CalibEvaluator(refit="fast" | "oneshot"): least-squares refits inside the one-pass reward."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spa.calib import Calib
from spa.errors import SpaError
from spa.models import zoo_path
from spa.search import CalibEvaluator, SearchProblem, search

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def resnet18():
    return str(zoo_path("resnet18", small=True))


@pytest.fixture(scope="module")
def problem(resnet18):
    return SearchProblem.build(resnet18, target_flops=0.3)


@pytest.fixture(scope="module")
def calib(problem):
    shape = problem.model.input_shapes["input"]
    return Calib({"input": np.random.default_rng(0).standard_normal((24, *shape[1:])).astype(np.float32)})


def candidates(problem, k, seed=1):
    rng = np.random.default_rng(seed)
    pj = problem.projector
    return [pj.project(rng.random(len(pj.action_groups))).kept for _ in range(k)]


def export(net, example, path):
    torch.onnx.export(net.eval(), (example,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["out"], dynamic_axes={"input": {0: "n"}, "out": {0: "n"}})
    return str(path)


def capture_apply(problem):
    """Wrap problem.apply to keep the last candidate's model (its refit weights are written into it) and rows."""
    seen = {}
    apply = problem.apply

    def wrapped(kept, rows=False):
        out = apply(kept, rows)
        seen["model"], seen["rows"] = out[0], out[3]
        return out

    problem.apply = wrapped
    return seen


def ridge_lstsq(u, y, w_p, damp):
    """The exact ridge least squares min ||u W'ᵀ - y||²/n + λ||W' - W_p||², λ = damp * mean(diag uᵀu/n), by
    numpy's lstsq on the stacked system (no normal equations)."""
    n, d = u.shape
    lam = damp * np.mean(np.einsum("ij,ij->j", u, u) / n)
    a = np.concatenate([u / np.sqrt(n), np.sqrt(lam) * np.eye(d)])
    b = np.concatenate([y / np.sqrt(n), np.sqrt(lam) * w_p.T])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


# ---- nothing removed --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fast", "oneshot"])
def test_nothing_removed_gives_the_original(problem, calib, mode):
    for recal in (False, True):
        m = CalibEvaluator(problem, calib, refit=mode, recalibrate=recal, threads=1)(problem.projector.full()).metrics
        assert m["agreement"] == 1.0 and m["kl"] < 1e-8 and m["rel_l2"] < 1e-4, (mode, recal, m)
        if mode == "oneshot":  # no layer lost an input column: nothing is refit, the outputs are the original's
            assert m["refit_layers"] == 0 and m["rel_l2"] == 0.0
        else:  # every layer is refit; the least-squares solution on unchanged inputs is the original weight
            assert m["refit_layers"] > 0


# ---- exact least squares on a linear model -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fast", "oneshot"])
@pytest.mark.parametrize("damp", [0.0, None])
def test_linear_gemm_refit_is_the_least_squares_solution(tmp_path, mode, damp):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 5))
    path = export(net, torch.zeros(1, 16), tmp_path / "mlp.onnx")
    p = SearchProblem.build(path, target_flops=0.5)
    kept = np.array(p.sizes)
    kept[list(kept).index(12)] = 6                          # the hidden units; the outputs (if a group) all kept
    x = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    seen = capture_apply(p)
    ev = CalibEvaluator(p, Calib({"input": x}), refit=mode, damp=damp, score_split=0.25, threads=1, metric="rel_l2")
    assert ev.n_stats == 30
    ev(kept)
    g, rows = seen["model"].graph, seen["rows"]
    fc1, fc2 = (n for n in g.nodes if n.op_type == "Gemm")
    keep = rows[fc1.name]                                   # fc1's kept output rows = fc2's kept input columns
    assert keep.sum() == 6 and rows[fc2.name].all()
    w1, b1 = net[0].weight.detach().double().numpy(), net[0].bias.detach().double().numpy()
    w2, b2 = net[1].weight.detach().double().numpy(), net[1].bias.detach().double().numpy()
    h = x[:30].astype(np.float64) @ w1.T + b1               # fc2's input on the statistics samples
    u = np.concatenate([h[:, keep], np.ones((30, 1))], 1)
    ref = ridge_lstsq(u, h @ w2.T + b2, np.concatenate([w2[:, keep], b2[:, None]], 1),
                      0.01 if damp is None else damp)
    got = np.concatenate([np.asarray(g.const(fc2.input[1]), np.float64),
                          np.asarray(g.const(fc2.input[2]), np.float64)[:, None]], 1)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    unrefit = np.concatenate([w2[:, keep], b2[:, None]], 1)
    assert np.abs(got - unrefit).max() > 1e-2 * np.abs(unrefit).max()  # the refit did move the weights
    if damp == 0.0:  # plain least squares: W' = W H[:, K] H[K, K]^-1 on the statistics samples
        plain = np.linalg.lstsq(u, h @ w2.T + b2, rcond=None)[0].T
        assert np.abs(got - plain).max() <= 1e-5 * np.abs(plain).max()
    # fc1 kept its rows: unchanged (oneshot: not touched; fast: refit to the same weights)
    np.testing.assert_allclose(np.asarray(g.const(fc1.input[1])), w1[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["fast", "oneshot"])
def test_linear_conv1d_refit_is_the_least_squares_solution(tmp_path, mode):
    """Conv1d -> Conv1d (padding 1, no nonlinearity): the refit of the second conv over every (sample,
    position) of the statistics samples, patches unfolded in the weight's (channel, kernel) column order."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 4, 3, padding=1))
    path = export(net, torch.zeros(1, 3, 10), tmp_path / "conv1d.onnx")
    p = SearchProblem.build(path, target_flops=0.5)
    kept = np.array(p.sizes)
    kept[list(kept).index(8)] = 3
    x = np.random.default_rng(2).standard_normal((20, 3, 10)).astype(np.float32)
    seen = capture_apply(p)
    CalibEvaluator(p, Calib({"input": x}), refit=mode, damp=0.0, threads=1, metric="rel_l2")(kept)
    g, rows = seen["model"].graph, seen["rows"]
    c1, c2 = (n for n in g.nodes if n.op_type == "Conv")
    keep = rows[c1.name]
    h = net[0](torch.from_numpy(x)).detach().double().numpy()         # (20, 8, 10)
    hp = np.pad(h, ((0, 0), (0, 0), (1, 1)))
    patches = np.stack([hp[:, :, t:t + 3] for t in range(10)], 1)      # (20, 10, 8, 3)
    w2, b2 = net[1].weight.detach().double().numpy(), net[1].bias.detach().double().numpy()
    y = patches.reshape(200, 24) @ w2.reshape(4, 24).T + b2
    u = np.concatenate([patches[:, :, keep].reshape(200, -1), np.ones((200, 1))], 1)
    ref = np.linalg.lstsq(u, y, rcond=None)[0].T
    got = np.concatenate([np.asarray(g.const(c2.input[1]), np.float64).reshape(4, -1),
                          np.asarray(g.const(c2.input[2]), np.float64)[:, None]], 1)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


# ---- against Reconstruct and the re-calibrated reward --------------------------------------------------------------
def test_fast_refit_reproduces_reconstruct(problem, calib):
    """With the positions Reconstruct samples (same seeded draws), refit="fast" is its refit without the second
    model: subsampled (64 positions per layer) and with re-calibration."""
    for kept in candidates(problem, 2):
        for recal in (False, True):
            kw = {"recalibrate": recal, "refit_positions": 64, "threads": 1}
            fast = CalibEvaluator(problem, calib, refit="fast", **kw)(kept).metrics
            exact = CalibEvaluator(problem, calib, refit=True, **kw)(kept).metrics
            assert fast["agreement"] == exact["agreement"]
            assert abs(fast["kl"] - exact["kl"]) <= 1e-4 * max(exact["kl"], 1e-3)
            assert abs(fast["rel_l2"] - exact["rel_l2"]) <= 1e-4


def test_refit_reward_not_below_recalibrated(problem, calib):
    """Measured, not a theorem (the refit minimizes each layer's error, the reward is a KL through ReLUs): on
    these candidates refit="fast" (with or without re-calibration) and refit="oneshot" with re-calibration score
    at least the re-calibrated reward, and the fast refit is closer to the original. refit="oneshot" WITHOUT
    re-calibration is not (it ignores upstream errors; it fell below on one of 12 candidates when this was
    written), so it is not asserted."""
    evs = {name: CalibEvaluator(problem, calib, threads=1, **kw) for name, kw in {
        "recal": {"recalibrate": True}, "fast": {"refit": "fast"},
        "fast+recal": {"refit": "fast", "recalibrate": True},
        "oneshot+recal": {"refit": "oneshot", "recalibrate": True}}.items()}
    for kept in candidates(problem, 3, seed=2):
        e = {name: ev(kept) for name, ev in evs.items()}
        for name in ("fast", "fast+recal", "oneshot+recal"):
            assert e[name].reward >= e["recal"].reward - 1e-9, (name, e[name].metrics, e["recal"].metrics)
        assert e["fast"].metrics["rel_l2"] < e["recal"].metrics["rel_l2"]


# ---- options --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"refit": "slow"}, "refit must be False, True, 'fast' or 'oneshot'"),
    ({"refit": "fast", "fast_recalibration": False}, "cannot be combined with fast_recalibration=False"),
    ({"refit": "fast", "damp": -1.0}, "damp must be"),
    ({"refit": "fast", "refit_positions": 0}, "refit_positions must be"),
    ({"refit": "fast", "refit_max_columns": 0}, "refit_max_columns must be"),
])
def test_option_errors_are_one_line(problem, calib, kwargs, message):
    with pytest.raises(SpaError) as err:
        CalibEvaluator(problem, calib, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wide_layers_are_skipped_and_said(problem, calib):
    ev = CalibEvaluator(problem, calib, refit="fast", refit_max_columns=100, threads=1)
    ev.teacher()
    assert ev.refit_skipped and all("refit_max_columns 100: not refit" in s for s in ev.refit_skipped)
    assert len(ev._refit_layers) + len(ev.refit_skipped) == sum(
        n.op_type in ("Conv", "Gemm") for n in problem.original_proto().graph.node)
    m = ev(candidates(problem, 1)[0]).metrics
    assert 0 < m["refit_layers"] <= len(ev._refit_layers)


def test_search_passes_reconstruct_fast(resnet18, problem, calib):
    _plan, history = search(resnet18, "random", evals=2, seed=0, problem=problem, calib=calib, reconstruct="fast",
                           threads=1)
    assert history.meta["metrics"]["refit_layers"] > 0
    with pytest.raises(SpaError, match="refit must be"):
        search(resnet18, "random", evals=2, problem=problem, calib=calib, reconstruct="yes")
