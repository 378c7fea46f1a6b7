"""spa.search iterative episodes (GNN-RL): prune in T steps, re-graph the pruned model after each, one evaluation."""
from __future__ import annotations

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
models = pytest.importorskip("spa.models")

from gymnasium.utils.env_checker import check_env

from spa.errors import SpaError
from spa.passes.analyse import Analyse
from spa.passes.normalize import infer_shapes
from spa.search import (
    EDGE_FEATURES,
    NODE_FEATURES,
    FunctionEvaluator,
    GroupGraph,
    PruningEnv,
    SearchProblem,
    get_policy,
    search,
)
from spa.search.graph import STATIC_NODE_FEATURES, group_map, unit_map

COL = {name: i for i, name in enumerate(NODE_FEATURES)}
N_STATIC = len(STATIC_NODE_FEATURES)
# columns that describe the layers around a group, not its width: channel pruning leaves them alone
STRUCTURE = [c for c in STATIC_NODE_FEATURES if c.startswith("op_")] + [
    "frozen", "sources_log", "residual", "concat", "kernel_log", "stride_log", "depthwise", "grouped", "fmap_log",
    "depth", "depth_last", "latency_share"]


@pytest.fixture(scope="module")
def resnet18():
    return str(models.zoo_path("resnet18", small=True))


@pytest.fixture(scope="module")
def problem(resnet18):
    return SearchProblem.build(resnet18, target_flops=0.5)


def planted(problem):
    return FunctionEvaluator(problem, lambda r: -float(np.abs(r - 0.6).sum()))


def play(env, rng, seed=None):
    """One episode of random actions: the observations, the kept vectors (the full model first) and the infos."""
    obs, _ = env.reset(seed=seed)
    observations, kept, infos, done = [obs], [env.projector.full()], [], False
    while not done:
        obs, reward, done, _, info = env.step(rng.uniform(-1, 1, env.n_nodes).astype(np.float32))
        assert done or reward == 0.0
        observations.append(obs)
        kept.append(info["kept"])
        infos.append(info)
    return observations, kept, infos


def applied(problem, kept):
    """The model pruned to `kept`, re-analysed, with its groups matched to the original's by source layers."""
    model, _, removed, _ = problem.apply(kept)
    g = model.graph
    g.shapes, g.dtypes = infer_shapes(g, fixed=model.input_shapes)
    model.analyses.clear()
    analysis = Analyse().run(model)
    by_sources = {frozenset(grp.sources): grp.id for grp in problem.analysis.groups}
    assert len(by_sources) == len(problem.analysis.groups)
    group_of = np.array([by_sources[frozenset(grp.sources)] for grp in analysis.groups])
    assert sorted(group_of.tolist()) == list(range(len(problem.analysis.groups)))   # a bijection
    return analysis, removed, group_of


# ---- the env API ------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*infinity")
def test_check_env_iterative(problem):
    env = PruningEnv(problem, planted(problem), iterative=True, steps=3)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert obs["nodes"].shape == (len(problem.analysis.groups), len(NODE_FEATURES))
    assert obs["edges"].shape == (problem.graph.num_edges, len(EDGE_FEATURES))
    assert env.observation_space["step"].n == 4


def test_options_are_checked(problem):
    with pytest.raises(SpaError, match="one-shot"):
        PruningEnv(problem, planted(problem), mode="sequential", iterative=True)
    with pytest.raises(SpaError, match="steps"):
        PruningEnv(problem, planted(problem), iterative=True, steps=0)
    env = PruningEnv(problem, planted(problem), iterative=True, steps=4)
    assert env.step_budgets(2) == pytest.approx({"flops": 0.5 ** 0.5})
    assert env.step_budgets(4) == {"flops": 0.5} and env.step_projector(4) is problem.projector


# ---- budgets, no growth, one evaluation per episode ---------------------------------------------------------------
@pytest.mark.parametrize("budgets", [{"target_flops": 0.5}, {"target_flops": 0.7, "target_params": 0.4}])
def test_episode_meets_budget_without_growth(resnet18, problem, budgets):
    p = SearchProblem.build(resnet18, scores=problem.scores, **budgets)
    env = PruningEnv(p, planted(p), iterative=True, steps=4)
    rng = np.random.default_rng(0)
    for episode in range(3):
        _, kept, infos = play(env, rng, seed=episode)
        assert len(infos) == 4 and len(env.history) == episode + 1   # one evaluation per episode
        for t in range(1, 5):
            assert (kept[t] <= kept[t - 1]).all()                       # nothing grows back
            pj = env.step_projector(t)
            goals = env.step_budgets(t)
            assert infos[t - 1]["costs"] == pj.costs(kept[t])
            assert all(infos[t - 1]["costs"][k] <= f for k, f in goals.items())
            assert not pj.growable(kept[t], kept[t - 1]), (episode, t)
        final = kept[-1]
        analysis = p.analysis
        for k, f in p.budgets.items():
            assert p.projector.costs(final)[k] <= f
        flops = analysis.macs_after(p.plan(final).roots(analysis)) / analysis.total_macs
        assert abs(flops - p.projector.costs(final)["flops"]) < 1e-12
        assert env.history[-1][1] == -float(np.abs(final / p.sizes - 0.6).sum())   # the final candidate
    assert env.plan().removed == p.plan(env.best.kept).removed


def test_single_step_is_one_shot(problem):
    action = np.random.default_rng(1).uniform(-1, 1, len(problem.analysis.groups)).astype(np.float32)
    one = PruningEnv(problem, planted(problem))
    it = PruningEnv(problem, planted(problem), iterative=True, steps=1)
    one.reset(seed=0)
    it.reset(seed=0)
    assert (one.step(action)[4]["kept"] == it.step(action)[4]["kept"]).all()
    assert it.regrapher.calls == 0


# ---- the re-graphed observation ---------------------------------------------------------------------------------
def test_observation_is_the_pruned_models_graph(problem):
    env = PruningEnv(problem, planted(problem), iterative=True, steps=4)
    obs0, _ = env.reset(seed=0)
    action = np.where(np.arange(env.n_nodes) % 2 == 0, 1.0, -0.8).astype(np.float32)   # keep half the groups whole
    obs1, _, done, _, info = env.step(action)
    assert not done
    kept = info["kept"]
    analysis, removed, group_of = applied(problem, kept)
    new, old = unit_map(problem.analysis, removed, analysis)
    assert (group_map(problem.analysis, analysis, new, old) == group_of).all()     # the atom mapping agrees with the names
    scores = {int(n): problem.scores[int(o)] for n, o in zip(new, old)}
    ref = GroupGraph.build(analysis, scores, scale=problem.graph.scale)
    static = np.empty_like(ref.static)
    static[group_of] = ref.static
    assert np.array_equal(obs1["nodes"][:, :N_STATIC], static)
    assert np.array_equal(obs1["edge_index"], obs0["edge_index"])
    edges = {(int(group_of[a]), int(group_of[b])): ref.edge_attr[k] for k, (a, b) in enumerate(ref.edge_index.T)}
    assert len(edges) == obs0["edge_index"].shape[1]                  # the pruned model has the same data flow
    for k, (a, b) in enumerate(obs0["edge_index"].T):
        assert np.array_equal(obs1["edges"][k], edges[(int(a), int(b))])
    assert np.allclose(obs1["nodes"][:, COL["keep_ratio"]], kept / problem.sizes)
    assert obs1["step"] == 1 and obs1["globals"][-1] == pytest.approx(0.25)

    # what changed: exactly the pruned groups' width, and the costs around them; never the structure
    changed = kept < problem.projector.full()
    assert changed.any() and not changed[problem.projector.action_groups].all()
    differs = (obs1["nodes"] != obs0["nodes"])
    for col in ("keep_ratio", "units_log"):
        assert (differs[:, COL[col]] == changed).all(), col
    assert differs[changed, COL["flops_share"]].all()
    ei = obs0["edge_index"]
    near = changed.copy()
    near[ei[0][changed[ei[1]]]] = True
    near[ei[1][changed[ei[0]]]] = True
    for col in ("flops_share", "params_share", "prunable_fraction", "imp_mean", "imp_std", "imp_min", "imp_level"):
        assert not differs[~near, COL[col]].any(), col
    assert not differs[:, [COL[c] for c in STRUCTURE]].any()
    edge_differs = (obs1["edges"] != obs0["edges"]).any(axis=1)
    assert (edge_differs == changed[ei[0]]).all()   # a link's features describe its source group


@pytest.mark.parametrize("name, min_channels", [("googlenet", 1), ("densenet121", 1), ("mobilenet_v2", 2)])
def test_groups_map_one_to_one(name, min_channels):
    """Concatenations (googlenet, densenet: give-backs), depthwise convs (mobilenet_v2): a bijection each step."""
    p = SearchProblem.build(str(models.zoo_path(name, small=True)), target_flops=0.3, min_channels=min_channels)
    env = PruningEnv(p, planted(p), iterative=True, steps=3)
    observations, kept, _ = play(env, np.random.default_rng(0), seed=0)
    analysis, _, group_of = applied(p, kept[1])
    assert (env.regrapher.build(kept[1]).static == observations[1]["nodes"][:, :N_STATIC]).all()
    assert env.regrapher.edge_mismatches == 0 and len(analysis.groups) == len(group_of)


def test_mapping_failure_is_a_clear_error(problem):
    kept = problem.projector.project(np.full(len(problem.projector.action_groups), 0.5)).kept
    analysis, removed, _ = applied(problem, kept)
    with pytest.raises(SpaError, match="cannot map the pruned model back"):
        unit_map(problem.analysis, set(), analysis)                     # channel counts disagree
    new, old = unit_map(problem.analysis, removed, analysis)
    with pytest.raises(SpaError, match="do not correspond one to one"):
        group_map(problem.analysis, analysis, new, np.full_like(old, old[0]))


# ---- determinism and the ppo-gnn agent ----------------------------------------------------------------------------
def test_iterative_env_is_deterministic(problem):
    runs = []
    for _ in range(2):
        env = PruningEnv(problem, planted(problem), iterative=True, steps=3)
        observations, kept, _ = play(env, np.random.default_rng(7), seed=7)
        runs.append((observations, kept, list(env.history)))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all((a == b).all() for a, b in zip(runs[0][1], runs[1][1])) and runs[0][2] == runs[1][2]


def test_ppo_gnn_iterative(problem):
    options = {"iterative": True, "steps": 3, "hidden": 16, "heads": 2, "batch": 4, "epochs": 2}
    ev = planted(problem)
    plan, hist = search(None, "ppo-gnn", evals=11, seed=0, problem=problem, evaluator=ev, policy_options=options)
    assert len(hist) == 11 and ev.calls == 11
    kept = np.array(hist.meta["kept"])
    assert problem.projector.feasible(kept) and hist.meta["costs"]["flops"] <= 0.5
    assert plan.removed == problem.plan(kept).removed
    # the same run through the policy directly: same candidates, 3 steps (2 re-graphs) per episode
    env = PruningEnv(problem, planted(problem))
    res = get_policy("ppo-gnn")(**options).search(env, 11, seed=0)
    assert env.iterative and env.n_steps == 3 and env.regrapher.calls == 2 * 11
    assert res.history == list(hist) and (res.kept == kept).all()
