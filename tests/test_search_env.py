"""spa.search: the RL environment over the group graph, exact budget projection, rewards, policies, controls."""
from __future__ import annotations

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
models = pytest.importorskip("spa.models")

from gymnasium.utils.env_checker import check_env

from spa import driver
from spa.calib import Calib
from spa.loading import param_count
from spa.passes.apply import Apply
from spa.search import (
    EDGE_FEATURES,
    NODE_FEATURES,
    POLICIES,
    CalibEvaluator,
    FunctionEvaluator,
    Policy,
    PruningEnv,
    SearchProblem,
    SearchResult,
    register_policy,
    search,
)


@pytest.fixture(scope="module")
def resnet18():
    return str(models.zoo_path("resnet18", small=True))


@pytest.fixture(scope="module")
def problem(resnet18):
    return SearchProblem.build(resnet18, target_flops=0.5)


@pytest.fixture(scope="module")
def calib(problem):
    """Random inputs with labels from the model's own predictions on a perturbed copy (something to score)."""
    rng = np.random.default_rng(0)
    shape = problem.model.input_shapes["input"]
    x = rng.standard_normal((24, *shape[1:])).astype(np.float32)
    y = rng.integers(0, 10, 24)
    return Calib({"input": x}, y)


def planted(problem):
    """Synthetic reward: highest when every group keeps 60 % of its units."""
    return FunctionEvaluator(problem, lambda r: -float(np.abs(r - 0.6).sum()))


def kept_fractions(problem, kept):
    analysis, pj = problem.analysis, problem.projector
    plan = pj.plan(kept)
    return analysis.macs_after(plan.roots(analysis)) / analysis.total_macs, plan


# ---- gymnasium conformance -----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*infinity")  # node features are unbounded by design
@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_check_env(problem, mode):
    env = PruningEnv(problem, planted(problem), mode=mode)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert obs["nodes"].shape == (len(problem.analysis.groups), len(NODE_FEATURES))
    assert obs["edges"].shape == (problem.graph.num_edges, len(EDGE_FEATURES))
    assert np.isfinite(obs["nodes"]).all() and np.isfinite(obs["edges"]).all()
    assert obs["edge_index"].max() < len(problem.analysis.groups)
    assert obs["mask"].sum() == len(problem.projector.action_groups)


def test_sequential_episode_meets_budget(problem):
    env = PruningEnv(problem, planted(problem), mode="sequential")
    obs, _ = env.reset(seed=1)
    done, steps = False, 0
    while not done:
        assert obs["current"] == env.order[steps]
        obs, _reward, done, _, info = env.step(np.array([1.0], dtype=np.float32))  # greedy: keep everything
        steps += 1
    assert steps == len(problem.projector.action_groups)
    flops, _ = kept_fractions(problem, info["kept"])
    assert flops <= 0.5 and info["feasible"]
    assert not problem.projector.growable(info["kept"])


# ---- budget projection ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, round_to, min_channels, mode",
                         [(0.5, 1, 1, "logit"), (0.3, 4, 2, "logit"), (0.25, 8, 1, "logit"), (0.4, 1, 3, "scale")])
def test_projection_flops_exact(resnet18, problem, target, round_to, min_channels, mode):
    p = SearchProblem.build(resnet18, target_flops=target, round_to=round_to, min_channels=min_channels,
                            mode=mode, scores=problem.scores)
    pj = p.projector
    rng = np.random.default_rng(0)
    for rho in [rng.random(len(pj.action_groups)) for _ in range(4)] + [np.full(len(pj.action_groups), 0.5)]:
        proj = pj.project(rho)
        flops, plan = kept_fractions(p, proj.kept)
        assert proj.feasible and flops <= target
        assert abs(flops - proj.costs["flops"]) < 1e-12  # the cost model is Analysis.macs_after
        assert not pj.growable(proj.kept)
        for g in p.analysis.groups:
            kept = g.size - len(plan.removed.get(g.id, []))
            if g.id in pj.action_groups:
                assert kept % round_to == 0 or kept == g.size
                assert kept >= min(min_channels, g.size)


def test_projection_params_exact(resnet18, problem):
    """Parameters: the cost model equals the float parameter count of the applied model."""
    p = SearchProblem.build(resnet18, target_params=0.4, target_flops=0.7, scores=problem.scores)
    pj = p.projector
    rng = np.random.default_rng(1)
    for _ in range(3):
        proj = pj.project(rng.random(len(pj.action_groups)))
        model = driver.load(resnet18)
        analysis = driver.analyse(model)
        Apply(analysis, pj.plan(proj.kept).roots(analysis)).run(model)
        params = param_count(model.graph) / pj.cost_model.params_total
        assert abs(params - proj.costs["params"]) < 1e-12
        assert params <= 0.4 and proj.costs["flops"] <= 0.7
        assert not pj.growable(proj.kept)


def test_projection_give_back_matches_plan():
    """DenseNet's concat pieces: prefix removal can empty a piece; the projector's mask follows keep_every_tensor."""
    p = SearchProblem.build(str(models.zoo_path("densenet121", small=True)), target_flops=0.4)
    pj = p.projector
    rng = np.random.default_rng(2)
    for _ in range(10):
        kept = pj.full()
        for g in pj.action_groups:
            kept[g] = rng.choice(pj._allowed[int(g)])
        assert (pj.removed(kept) == pj.cost_model.removed_mask(p.analysis, pj.plan(kept))).all()
    proj = pj.project(rng.random(len(pj.action_groups)))
    assert kept_fractions(p, proj.kept)[0] <= 0.4


def test_unreachable_budget_is_reported(resnet18, problem):
    p = SearchProblem.build(resnet18, target_flops=0.001, scores=problem.scores)
    proj = p.projector.project(np.full(len(p.projector.action_groups), 0.5))
    assert not proj.feasible
    assert (proj.kept == p.projector.minimum()).all()


# ---- graph ----------------------------------------------------------------------------------------------------
def test_group_graph_edges_follow_data_flow(problem):
    gg, analysis = problem.graph, problem.analysis
    edges = set(map(tuple, gg.edge_index.T.tolist()))
    assert edges and all(a != b for a, b in edges)
    stem = 0  # the stem's group (with the first stage's residual convs) feeds the first block's conv1
    first = next(g.id for g in analysis.groups if "layers.0.0/conv1" in g.name)
    assert (stem, first) in edges and (first, stem) in edges  # a residual block is a 2-cycle
    names = list(NODE_FEATURES)
    static = gg.static
    assert static[stem, names.index("residual")] == 1.0
    classifier = next(g.id for g in analysis.groups if g.prunable == 0)
    assert static[classifier, names.index("frozen")] == 1.0
    share = static[:, names.index("flops_share")]  # a conv's MACs scale with its input and its output group
    assert (share >= 0).all() and (share <= 1).all() and 1.0 <= share.sum() <= 2.0


# ---- rewards --------------------------------------------------------------------------------------------------
def test_fast_recalibration_equals_reconstruct(problem, calib):
    """The evaluator's one-pass re-calibration does what passes.reconstruct.Reconstruct(recalibrate=True) does."""
    kept = problem.projector.project(np.random.default_rng(3).random(len(problem.projector.action_groups))).kept
    fast = CalibEvaluator(problem, calib, recalibrate=True, threads=1)(kept).metrics
    slow = CalibEvaluator(problem, calib, recalibrate=True, fast_recalibration=False, threads=1)(kept).metrics
    assert fast["agreement"] == slow["agreement"]
    assert abs(fast["kl"] - slow["kl"]) <= 1e-4 * max(1.0, slow["kl"])
    assert abs(fast["rel_l2"] - slow["rel_l2"]) <= 1e-4


def test_evaluator_caches_and_rewards(problem, calib):
    ev = CalibEvaluator(problem, calib, threads=1)
    assert ev.metric == "accuracy"
    full = problem.projector.full()
    e = ev(full)
    assert e.metrics["agreement"] == 1.0 and e.metrics["kl"] < 1e-8 and e.metrics["flops"] == 1.0
    assert ev(full).cached and ev.measured == 1 and ev.calls == 2
    ev.alpha = 1.0  # a changed weight applies to cached metrics too
    assert ev(full).reward == pytest.approx(e.reward)  # nothing removed: alpha * 0
    kl_ev = CalibEvaluator(problem, Calib(calib.inputs), threads=1)
    assert kl_ev.metric == "kl"


# ---- policies and controls ------------------------------------------------------------------------------------
def test_controls_meet_budget_exactly(resnet18, problem, calib):
    ev = CalibEvaluator(problem, calib, threads=1)
    for name in ("uniform", "global", "lamp", "random"):
        plan, history = search(resnet18, name, evals=4, seed=0, problem=problem, evaluator=ev)
        assert len(history) == (4 if name == "random" else 1)
        assert [b for _, _, b in history] == sorted(b for _, _, b in history)  # best so far never drops
        kept = np.array(history.meta["kept"])
        flops, _ = kept_fractions(problem, kept)
        assert flops <= 0.5 and abs(flops - history.meta["costs"]["flops"]) < 1e-12
        assert not problem.projector.growable(kept), name
    # the chosen plan goes through the driver's apply/verify path
    from spa.search import prune_with_plan
    rep = prune_with_plan(resnet18, None, plan, problem).report
    assert rep["verification"]["status"] == "passed"
    assert rep["macs"]["ratio"] <= 0.5 and abs(rep["macs"]["ratio"] - flops) < 1e-9


def test_search_is_deterministic(resnet18, problem, calib):
    runs = []
    for _ in range(2):
        ev = CalibEvaluator(problem, calib, recalibrate=True, threads=1, seed=0)
        plan, history = search(resnet18, "random", evals=3, seed=7, problem=problem, evaluator=ev)
        runs.append((plan.removed, list(history)))
    assert runs[0] == runs[1]
    env = PruningEnv(problem, planted(problem))
    a = env.reset(seed=5)[0]
    b = env.reset(seed=5)[0]
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_register_policy(resnet18, problem):
    @register_policy("test-planted")
    class Hill(Policy):
        """Coordinate ascent on the env's one-shot action (a stand-in for a policy network)."""

        def search(self, env, evals, seed=0):
            _obs, _ = env.reset(seed=seed)
            rho = np.full(len(env.action_groups), 0.5)
            env.step(env.ratios_to_action(rho))
            rng = np.random.default_rng(seed)
            while env.evaluations < evals:
                trial = np.clip(rho + rng.normal(0, 0.2, len(rho)), 0, 1)
                env.reset()
                _, reward, done, _, _ = env.step(env.ratios_to_action(trial))
                assert done
                if reward >= env.best.reward:
                    rho = trial
            return SearchResult.from_env(env)

    assert POLICIES["test-planted"] is Hill
    _plan, history = search(resnet18, "test-planted", evals=10, problem=problem, evaluator=planted(problem))
    assert len(history) == 10 and history.meta["policy"] == "test-planted"
    assert kept_fractions(problem, np.array(history.meta["kept"]))[0] <= 0.5
    del POLICIES["test-planted"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch's legacy exporter
def test_fast_recalibration_reestimates_batchnorm(tmp_path):
    """An export that keeps BatchNormalization nodes: BN statistics re-estimated, as Reconstruct does."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12))
            self.fc = nn.Linear(12, 10)

        def forward(self, x):
            h = self.a(x)
            return self.fc(torch.relu(self.b(h) + h).mean((2, 3)))

    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "bn.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "n"}},
                      training=torch.onnx.TrainingMode.PRESERVE)
    p = SearchProblem.build(str(path), target_flops=0.5)
    assert any(n.op_type == "BatchNormalization" for n in p.original_proto().graph.node)
    data = Calib({"input": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)})
    kept = p.projector.project(np.full(len(p.projector.action_groups), 0.5)).kept
    assert (kept < p.projector.sizes).any()
    fast = CalibEvaluator(p, data, recalibrate=True)(kept).metrics
    slow = CalibEvaluator(p, data, recalibrate=True, fast_recalibration=False)(kept).metrics
    assert abs(fast["kl"] - slow["kl"]) <= 1e-4 * max(1.0, slow["kl"])
    assert abs(fast["rel_l2"] - slow["rel_l2"]) <= 1e-4
