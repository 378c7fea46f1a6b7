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

The reward comes from the pluggable `Evaluator` (`reward.py`). `info` carries the kept counts, their costs and the
evaluator's metrics. Every evaluation made through the env (`step`, or a policy's `evaluate_ratios`) is logged in
`env.history` as (evaluation index, reward, best so far) across episodes; `env.best` holds the best candidate.

`iterative=True` is reserved for GNN-RL's re-graphing episodes (prune, rebuild the graph of the pruned model,
repeat until the budget is met); it is not implemented yet - subclasses can override `_observe`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ..errors import SpaError
from .graph import EDGE_FEATURES, NODE_FEATURES
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
                 iterative: bool = False, progress=None):
        if mode not in MODES:
            raise SpaError(f"unknown env mode '{mode}' (choose from {', '.join(MODES)})")
        if iterative:
            raise NotImplementedError("iterative (GNN-RL re-graphing) episodes are not implemented yet")
        self.problem, self.evaluator, self.mode = problem, evaluator, mode
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
        self.n_steps = 1 if mode == "one-shot" else len(self.order)
        self.sizes = pj.sizes.astype(np.float64)
        self.min_ratio = (pj.min_kept / np.maximum(self.sizes, 1)).astype(np.float32)
        n_feat = len(NODE_FEATURES)
        self.observation_space = spaces.Dict({
            "nodes": spaces.Box(-np.inf, np.inf, (self.n_nodes, n_feat), np.float32),
            "edge_index": spaces.Box(0, max(self.n_nodes - 1, 0), (2, gg.num_edges), np.int64),
            "edges": spaces.Box(-np.inf, np.inf, (gg.num_edges, len(EDGE_FEATURES)), np.float32),
            "mask": spaces.MultiBinary(self.n_nodes),
            "current": spaces.Discrete(self.n_nodes + 1),
            "step": spaces.Discrete(self.n_steps + 1),
            "globals": spaces.Box(-np.inf, np.inf, (len(GLOBAL_FEATURES),), np.float32),
        })
        shape = (self.n_nodes,) if mode == "one-shot" else (1,)
        self.action_space = spaces.Box(-1.0, 1.0, shape, np.float32)
        self.history: list[tuple[int, float, float]] = []
        self.best: Best | None = None
        self.last_evaluation: Evaluation | None = None
        self._t = 0
        self._kept = pj.full()
        self._decided = np.zeros(self.n_nodes, dtype=bool)

    # ---- gymnasium API -------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._kept = self.projector.full()
        self._decided = np.zeros(self.n_nodes, dtype=bool)
        return self._observe(), {}

    def step(self, action):
        if self._t >= self.n_steps:
            raise SpaError("step() after the episode ended: call reset()")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if self.mode == "one-shot":
            if a.shape != (self.n_nodes,):
                raise SpaError(f"one-shot action must have shape ({self.n_nodes},), got {a.shape}")
            rho = (a[self.action_groups] + 1.0) / 2.0
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

    def _finish(self, rho):
        proj = self.projector.project(rho)
        self._kept = proj.kept
        self._decided[self.action_groups] = True
        ev = self.evaluate(proj.kept)
        self.last_evaluation = ev  # (whether it came from the cache is here, not in info: info is deterministic)
        info = {"kept": proj.kept.copy(), "costs": proj.costs, "feasible": proj.feasible, "shift": proj.shift,
                "metrics": ev.metrics}
        return self._observe(), float(ev.reward), True, False, info

    # ---- evaluation log (shared by RL episodes and the controls) -----------------------------------------------
    def evaluate(self, kept: np.ndarray) -> Evaluation:
        """Evaluate a kept-count vector (already feasible) and log it."""
        ev = self.evaluator(kept)
        index = len(self.history)
        if self.best is None or ev.reward > self.best.reward:
            self.best = Best(ev.reward, np.asarray(kept).copy(), index, ev)
        self.history.append((index, float(ev.reward), float(self.best.reward)))
        if self.progress is not None:
            self.progress(index, float(ev.reward), float(self.best.reward))
        return ev

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
        """Override to re-graph (GNN-RL's iterative episodes) or to add features."""
        pj = self.projector
        gg = self.problem.graph
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
