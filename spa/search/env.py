"""`PruningEnv`: a gymnasium environment over the group graph of one ONNX model.

Observation (a `spaces.Dict` of numpy arrays, fixed shapes per model):

    nodes       (N, F) float32   node features, columns `graph.NODE_FEATURES` (static + dynamic)
    edge_index  (2, E) int64     data-flow edges between groups (row 0 -> row 1), see `graph.py`
    edges       (E, Fe) float32  edge features, columns `graph.EDGE_FEATURES`
    mask        (N,) int8        1 for the groups a policy controls (`projector.action_groups`)
    current     Discrete(N + 1)  the group being decided (sequential mode); N when none
    step        Discrete(T + 1)  decisions taken in this episode
    globals     (G,) float32     columns `GLOBAL_FEATURES`: budgets, current costs, progress

N counts every coupled group (frozen ones included, they carry structure); only masked nodes are actions.

Actions are desired keep ratios in [-1, 1] (ratio = (a + 1) / 2):

* `one-shot`: Box(-1, 1, (N,)) - one value per node (unmasked entries are ignored). The ratios are projected onto
  the budget (`BudgetProjector.project`: common logit shift + greedy fill), the candidate is evaluated and the
  episode ends. Equal values everywhere give the uniform allocation: only relative values matter.
* `sequential`: Box(-1, 1, (1,)) - the keep ratio of the current group; groups are visited in topological order
  (AMC/AutoDFP). A ratio is clipped so that the budget stays reachable with every later group at its minimum
  (`projector.clip_step`); after the last group the decided ratios are projected like a one-shot action (the
  shift can only grow them: it fills the slack the decisions left). Reward 0 until then.

The reward comes from the pluggable `Evaluator` (`reward.py`), run by the env's executor (`executor.py`: in
this process, or on Ray workers; `evaluate_many` hands a batch of candidates over at once). `info` carries the
kept counts, their costs and the evaluator's metrics. Every evaluation made through the env (`step`, or a policy's
`evaluate_ratios` / `evaluate_many`) is logged in `env.history` as (evaluation index, reward, best so far) across
episodes; `env.best` holds the best candidate.

**Iterative episodes** (`iterative=True`, one-shot mode, GNN-RL): the budget is reached in `steps` steps (default 4)
on a geometric schedule, budget kind by kind: step t of T aims at f^(t/T) of the original for a budget f. At each
step the action is a keep ratio per action group *of its current units*; it is projected onto the step's budget
with no group growing back (`project_capped`: `BudgetProjector.project` with the groups it would put above their
current count pinned there), the counts are applied to the model (`SearchProblem.apply`) and the group graph is
rebuilt from the pruned ONNX (`Regrapher`: re-analysis, features on the original's scale, groups mapped back to
the original's ids; the edge list stays the original's). The next observation describes the pruned network.
Reward 0 until the last step, whose candidate (kept counts relative to the original, on the final budget) is the
episode's only evaluation. The observation returned with the last step keeps the previous step's graph (nothing
acts on it; re-graphing it would add 1/T to the cost).
"""
from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from spa.passes.analyse import Analyse
from spa.passes.normalize import infer_shapes

from ..budget import BudgetProjector, Projection
from ..errors import SpaError
from .executor import LocalExecutor
from .graph import (
    EDGE_FEATURES,
    NODE_FEATURES,
    STATIC_NODE_FEATURES,
    GroupGraph,
    group_map,
    unit_map,
)
from .problem import SearchProblem
from .reward import Evaluation, Evaluator

MODES = ("one-shot", "sequential")
GLOBAL_FEATURES = ("target_flops", "target_params", "flops_now", "params_now", "flops_min", "params_min",
                   "progress")


@dataclass
class Best:
    reward: float
    kept: np.ndarray
    index: int
    evaluation: Evaluation


class PruningEnv(gym.Env):
    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(self, problem: SearchProblem, evaluator: Evaluator, mode: str = "one-shot",
                 iterative: bool = False, progress=None, steps: int = 4, executor=None):
        if mode not in MODES:
            raise SpaError(f"unknown env mode '{mode}' (choose from {', '.join(MODES)})")
        self.problem, self.evaluator, self.mode = problem, evaluator, mode
        self.executor = executor if executor is not None else LocalExecutor(evaluator)
        self.progress = progress
        pj = problem.projector
        self.projector = pj
        gg = problem.graph
        self.n_nodes = gg.num_nodes
        self.action_groups = pj.action_groups
        if not len(self.action_groups):
            raise SpaError("nothing to search: the constraints leave every group a single allowed width")
        self.mask = np.zeros(self.n_nodes, dtype=np.int8)
        self.mask[self.action_groups] = 1
        action_set = set(self.action_groups.tolist())
        self.order = np.array([g for g in gg.topo_order if int(g) in action_set], dtype=np.int64)
        self.sizes = pj.sizes.astype(np.float64)
        self.min_ratio = (pj.min_kept / np.maximum(self.sizes, 1)).astype(np.float32)
        shape = (self.n_nodes,) if mode == "one-shot" else (1,)
        self.action_space = spaces.Box(-1.0, 1.0, shape, np.float32)
        self.regrapher: Regrapher | None = None
        self.set_episodes(iterative, steps)
        self.history: list[tuple[int, float, float]] = []
        self.best: Best | None = None
        self.last_evaluation: Evaluation | None = None
        self._t = 0
        self._kept = pj.full()
        self._decided = np.zeros(self.n_nodes, dtype=bool)
        self._graph = gg

    def set_episodes(self, iterative: bool, steps: int = 4) -> None:
        """Switch between single-decision episodes and iterative ones of `steps` re-graphing steps (a policy that
        needs iterative episodes calls this on the env it is given; the evaluation log is kept)."""
        if iterative and self.mode != "one-shot":
            raise SpaError("iterative episodes take one-shot actions: use mode='one-shot'")
        if iterative and (int(steps) != steps or steps < 1):
            raise SpaError(f"iterative episodes need a whole number of steps >= 1, got {steps}")
        self.iterative = bool(iterative)
        if self.iterative:
            self.n_steps = int(steps)
            self._step_projectors: dict[int, BudgetProjector] = {}
            if self.regrapher is None:
                self.regrapher = Regrapher(self.problem)
        else:
            self.n_steps = 1 if self.mode == "one-shot" else len(self.order)
        self.observation_space = self._observation_space()
        self._t = 0

    def _observation_space(self) -> spaces.Dict:
        gg = self.problem.graph
        return spaces.Dict({
            "nodes": spaces.Box(-np.inf, np.inf, (self.n_nodes, len(NODE_FEATURES)), np.float32),
            "edge_index": spaces.Box(0, max(self.n_nodes - 1, 0), (2, gg.num_edges), np.int64),
            "edges": spaces.Box(-np.inf, np.inf, (gg.num_edges, len(EDGE_FEATURES)), np.float32),
            "mask": spaces.MultiBinary(self.n_nodes),
            "current": spaces.Discrete(self.n_nodes + 1),
            "step": spaces.Discrete(self.n_steps + 1),
            "globals": spaces.Box(-np.inf, np.inf, (len(GLOBAL_FEATURES),), np.float32),
        })

    # ---- gymnasium API -------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._kept = self.projector.full()
        self._decided = np.zeros(self.n_nodes, dtype=bool)
        self._graph = self.problem.graph
        return self._observe(), {}

    def step(self, action):
        if self._t >= self.n_steps:
            raise SpaError("step() after the episode ended: call reset()")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if self.mode == "one-shot":
            if a.shape != (self.n_nodes,):
                raise SpaError(f"one-shot action must have shape ({self.n_nodes},), got {a.shape}")
            rho = (a[self.action_groups] + 1.0) / 2.0
            if self.iterative:
                return self._iterate(rho)
            self._t = 1
            return self._finish(rho)
        g = int(self.order[self._t])
        proposed = self.projector.count(g, float((a[0] + 1.0) / 2.0) * self.sizes[g])
        undecided = self.order[self._t + 1:]
        self._kept[g] = self.projector.clip_step(self._kept, g, proposed, undecided)
        self._decided[g] = True
        self._t += 1
        if self._t < self.n_steps:
            return self._observe(), 0.0, False, False, {"group": g, "kept": int(self._kept[g])}
        rho = self._kept[self.action_groups] / self.sizes[self.action_groups]
        return self._finish(rho)

    def step_many(self, actions) -> list[tuple]:
        """One single-step episode per one-shot action, every one from the reset state, their candidates
        evaluated as one batch (in parallel on a Ray cluster): the (observation, reward, terminated, truncated,
        info) each `reset(); step(action)` would return, in order. The env ends in the last episode's state."""
        if self.mode != "one-shot" or self.iterative:
            raise SpaError("step_many plays single-step one-shot episodes: use mode='one-shot', not iterative")
        projections = []
        for action in actions:
            a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
            if a.shape != (self.n_nodes,):
                raise SpaError(f"one-shot action must have shape ({self.n_nodes},), got {a.shape}")
            projections.append(self.projector.project((a[self.action_groups] + 1.0) / 2.0))
        evaluations = self.evaluate_many([proj.kept for proj in projections])
        out = []
        for proj, ev in zip(projections, evaluations):
            self.reset()
            self._t = 1
            out.append(self._conclude(proj, ev))
        return out

    def _finish(self, rho):
        return self._conclude(self.projector.project(rho))

    def _conclude(self, proj: Projection, ev: Evaluation | None = None):
        """Evaluate the episode's candidate (every action group decided; `ev`: evaluated already) and end the
        episode."""
        self._kept = proj.kept
        self._decided[self.action_groups] = True
        if ev is None:
            ev = self.evaluate(proj.kept)
        self.last_evaluation = ev  # (whether it came from the cache is here, not in info: info is deterministic)
        info = {"kept": proj.kept.copy(), "costs": proj.costs, "feasible": proj.feasible, "shift": proj.shift,
                "metrics": ev.metrics}
        return self._observe(), float(ev.reward), True, False, info

    # ---- iterative episodes --------------------------------------------------------------------------------------
    def _iterate(self, share):
        """One step of an iterative episode: `share` of each action group's current units is desired; project
        onto this step's budget without growth, prune and re-graph (or conclude on the last step)."""
        ag = self.action_groups
        rho = share * self._kept[ag] / self.sizes[ag]
        pj = self.step_projector(self._t + 1)
        proj = project_capped(pj, rho, self._kept)
        self._t += 1
        if self._t == self.n_steps:
            return self._conclude(proj)
        self._kept = proj.kept.copy()
        self._graph = self.regrapher(self._kept)
        info = {"kept": proj.kept.copy(), "costs": proj.costs, "feasible": proj.feasible, "shift": proj.shift,
                "budgets": dict(pj.budgets)}
        return self._observe(), 0.0, False, False, info

    def step_budgets(self, t: int) -> dict[str, float]:
        """The budgets of step t (1..T) of an iterative episode: f^(t/T) of the original per budget kind."""
        return {k: f ** (t / self.n_steps) for k, f in self.projector.budgets.items()}

    def step_projector(self, t: int) -> BudgetProjector:
        """The projector of step t (the problem's own on the last step; built once per step and cached)."""
        if t >= self.n_steps:
            return self.projector
        if t not in self._step_projectors:
            self._step_projectors[t] = dataclasses.replace(self.projector, budgets=self.step_budgets(t))
        return self._step_projectors[t]

    # ---- evaluation log (shared by RL episodes and the controls) -----------------------------------------------
    def evaluate(self, kept: np.ndarray) -> Evaluation:
        """Evaluate a kept-count vector (already feasible) and log it."""
        return self.evaluate_many([kept])[0]

    def evaluate_many(self, candidates) -> list[Evaluation]:
        """Evaluate kept-count vectors (a list or a generator) through the executor - in parallel on a Ray
        cluster - and log them in the order given, each as it finishes: the log is the one a loop of
        `evaluate` calls would write."""
        out = []
        for kept, ev in self.executor.map(candidates):
            index = len(self.history)
            if self.best is None or ev.reward > self.best.reward:
                self.best = Best(ev.reward, np.asarray(kept).copy(), index, ev)
            self.history.append((index, float(ev.reward), float(self.best.reward)))
            if self.progress is not None:
                self.progress(index, float(ev.reward), float(self.best.reward))
            out.append(ev)
        return out

    def evaluate_ratios(self, rho) -> tuple[Evaluation, np.ndarray]:
        """Project desired keep ratios of the action groups onto the budget, evaluate, log; (evaluation, kept)."""
        proj = self.projector.project(rho)
        return self.evaluate(proj.kept), proj.kept

    @property
    def evaluations(self) -> int:
        return len(self.history)

    def clear_history(self) -> None:
        self.history, self.best = [], None

    # ---- observation ---------------------------------------------------------------------------------------------
    def _observe(self) -> dict:
        """The observation of the current state (of the current pruned model's graph in iterative episodes);
        override to add features."""
        pj = self.projector
        gg = self._graph
        keep_ratio = (self._kept / np.maximum(self.sizes, 1)).astype(np.float32)
        now = pj.costs(self._kept)
        floor = self._kept.copy()
        undecided = [int(g) for g in self.action_groups if not self._decided[g]]
        floor[undecided] = pj.min_kept[undecided]
        low = pj.costs(floor)
        used = max(now[k] / f for k, f in pj.budgets.items())
        left = 1.0 - max(low[k] / f for k, f in pj.budgets.items())
        current = int(self.order[self._t]) if self.mode == "sequential" and self._t < self.n_steps else None
        nodes = gg.node_features(keep_ratio, self.min_ratio, self._decided.astype(np.float32), current, used, left)
        glob = np.array([pj.budgets.get("flops", 0.0), pj.budgets.get("params", 0.0), now["flops"], now["params"],
                         low["flops"], low["params"], self._t / max(self.n_steps, 1)], dtype=np.float32)
        return {"nodes": nodes.astype(np.float32), "edge_index": gg.edge_index.astype(np.int64),
                "edges": gg.edge_attr.astype(np.float32), "mask": self.mask.copy(),
                "current": np.int64(self.n_nodes if current is None else current), "step": np.int64(self._t),
                "globals": glob}

    # ---- helpers for policies ------------------------------------------------------------------------------------
    def ratios_to_action(self, rho) -> np.ndarray:
        """One-shot action (all nodes) for desired keep ratios of the action groups."""
        a = np.zeros(self.n_nodes, dtype=np.float32)
        a[self.action_groups] = 2.0 * np.clip(np.asarray(rho, dtype=np.float64), 0.0, 1.0) - 1.0
        return a

    def plan(self, kept=None):
        """The PruningPlan of `kept` (default: the best candidate so far)."""
        if kept is None:
            if self.best is None:
                raise SpaError("no candidate evaluated yet")
            kept = self.best.kept
        return self.problem.plan(kept)


# ---- iterative episodes: projection without growth, re-graphing --------------------------------------------------
def project_capped(pj: BudgetProjector, rho, cap: np.ndarray) -> Projection:
    """`pj.project(rho)` with every action group kept at most `cap[g]` units (kept counts never grow back within
    an iterative episode): groups the projection puts above their cap are pinned at it and the others projected
    again, until none is above. Pinning a group lower only frees budget, so the result stays feasible whenever
    `cap` plus the free groups at their minimum is; it is maximal given the caps (a free group cannot take its
    next step, a pinned one is at its cap)."""
    pinned: dict[int, int] = {}
    while True:
        proj = pj.project(rho, pinned)
        over = [int(g) for g in pj.action_groups if int(g) not in pinned and proj.kept[g] > cap[g]]
        if not over:
            return proj
        pinned.update((g, int(cap[g])) for g in over)


class Regrapher:
    """The group graph of the model pruned to a kept-count vector, in the original's node and edge order.

    Each call applies the counts to a fresh copy of the original (`SearchProblem.apply`), infers the pruned
    shapes, re-analyses the pruned ONNX and builds its `GroupGraph` on the original's scale, with every kept unit
    scored as it was in the original (re-scoring would need calibration passes; the criterion already chose which
    units go). The pruned groups are mapped back to the original's ids (`graph.unit_map` / `group_map`, an error
    when they do not correspond one to one). The measured latency share column is carried over from the original
    graph (a latency table describes the original's groups). The original's edge list is kept: only the features
    are recomputed. Results are cached by kept vector (`cache` most recent); `seconds` / `built` measure the cost.
    """

    def __init__(self, problem: SearchProblem, cache: int = 64):
        self.problem = problem
        self.cache_size = cache
        self._cache: OrderedDict[bytes, GroupGraph] = OrderedDict()
        self.seconds, self.built, self.calls, self.edge_mismatches = 0.0, 0, 0, 0

    def __call__(self, kept: np.ndarray) -> GroupGraph:
        self.calls += 1
        key = np.asarray(kept, dtype=np.int64).tobytes()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        t0 = time.perf_counter()
        graph = self.build(kept)
        self.seconds += time.perf_counter() - t0
        self.built += 1
        self._cache[key] = graph
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return graph

    def pruned(self, kept: np.ndarray):
        """(pruned model, its analysis, group_of, unit scores): the candidate applied and re-analysed."""
        problem = self.problem
        model, _, removed, _ = problem.apply(np.asarray(kept, dtype=np.int64))
        g = model.graph
        g.shapes, g.dtypes = infer_shapes(g, fixed=model.input_shapes)
        analysis = Analyse().run(model)
        new, old = unit_map(problem.analysis, removed, analysis)
        group_of = group_map(problem.analysis, analysis, new, old)
        scores = {int(n): problem.scores[int(o)] for n, o in zip(new.tolist(), old.tolist())}
        return model, analysis, group_of, scores

    def build(self, kept: np.ndarray) -> GroupGraph:
        """The original graph with the static node features and the edge features of the pruned model's graph."""
        original = self.problem.graph
        _, analysis, group_of, scores = self.pruned(kept)
        pruned = GroupGraph.build(analysis, scores, scale=original.scale)
        static, edge_attr, mismatched = pruned.in_original_order(group_of, original)
        self.edge_mismatches += mismatched
        latency = STATIC_NODE_FEATURES.index("latency_share")
        static[:, latency] = original.static[:, latency]
        return dataclasses.replace(original, static=static, edge_attr=edge_attr)
