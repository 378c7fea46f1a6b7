"""The pattern search (AutoSculpt, issue 13 part 3): K (kept positions per kernel) per patterned convolution under a
budget of pattern-aware MACs, chosen by PPO over a GATv2 encoder (`sculpt_ppo`) or by the controls (uniform,
random), every candidate scored by the channel search's evaluator (`reward.CalibEvaluator`, fast refit).

    from spa.search.sculpt import search_patterns, prune_with_patterns
    assignment, history = search_patterns("m.onnx", target_flops=0.3, calib="calib.npz", evals=64)
    prune_with_patterns("m.onnx", "out.onnx", assignment, calib="calib.npz")   # the normal pattern path

**Action → assignment** (`PatternSpace.assign`): per patterned conv l (kernel of n_l positions, O·C kernels, P_l
output positions per sample) a level in LEVELS (K = 1..6 or dense). If the pattern-aware MACs

    MACs = MACs of every other layer + Σ_l P_l · (O·C − e_l) · K_l          (e_l: kernels emptied)

exceed the budget, every conv empties the same share c of its kernels (connectivity pruning, e_l = ⌊c·O·C⌋,
the smallest c that meets the budget, by bisection), then layers in order take kernels back while the budget
holds: every candidate lands at the budget (as close under it as one kernel allows) and the comparison between
policies is at equal pattern-aware MACs. `spa.patterns.apply_patterns(per_layer=)` applies it with exactly
these counts (the tests compare the report's pattern-aware MACs).

**Scoring**: the candidate's patterns (magnitude choice per kernel, the library at its K) on a copy of the
normalized model, then `CalibEvaluator`'s one torch pass with refit="fast" whose per-layer solve does what the
pattern path's reconstruction does (`PatternRefit`: shapes chosen again by OBS on the layer's actual input,
then each output row refit on its kept positions, `spa.patterns.refit_masked`), scored on the calibration
samples held out from the refit's statistics (`score_split`). The chosen assignment then goes through the
driver's pattern path (`prune_with_patterns`: masks, checks, OBS re-choice, full masked refit, report).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from spa.passes.fidelity import compare

from .. import driver
from ..errors import SpaError
from ..patterns import (
    LARGEST_PATTERN,
    apply_patterns,
    choose_by_obs,
    library,
    pattern_layers,
    refit_masked,
    refit_support,
)
from .onepass import candidate_pass
from .problem import SearchProblem
from .refit import LayerRefit
from .reward import CalibEvaluator

LEVELS = (1, 2, 3, 4, 5, 6, None)     # K per kernel; None: the layer stays dense
PATTERN_POLICIES: dict = {}   # name -> search(run, problem, evals, seed, **options) -> info dict


@dataclass
class PatternLayer:
    """One patterned conv: node, weight, kernel positions n, kernels O·C/g, output positions per sample, and the
    share of its weight energy the best pattern per kernel keeps at K = 1..6 (magnitude choice)."""

    name: str
    weight: str
    n: int
    kernels: int
    positions: int
    energy: np.ndarray

    def k_of(self, level: int) -> int:
        return self.n if LEVELS[level] is None else min(LEVELS[level], self.n)

    @property
    def dense_macs(self) -> int:
        return self.positions * self.kernels * self.n


@dataclass
class Assignment:
    """K and emptied kernels per patterned conv (layer order of the space), the resulting MACs."""

    k: np.ndarray
    empty: np.ndarray
    macs: int
    feasible: bool = True

    def key(self) -> tuple:
        return tuple(int(v) for pair in zip(self.k, self.empty) for v in pair)

    def per_layer(self, space: PatternSpace) -> dict:
        """node name -> (K, connectivity) for spa.patterns.apply_patterns / PruneOptions.pattern_assignment."""
        return {lay.name: (int(k), float(e) / lay.kernels) for lay, k, e in zip(space.layers, self.k, self.empty)}


class PatternSpace:
    """The patterned convs of a problem's normalized model and the exact pattern-aware MAC count of an
    assignment (module docstring)."""

    def __init__(self, problem: SearchProblem, target_flops: float):
        if not 0.0 < target_flops <= 1.0:
            raise SpaError(f"--target-flops must be in (0, 1], got {target_flops}")
        g = problem.model.graph
        self.layers: list[PatternLayer] = []
        for node, w in pattern_layers(g, 1):
            shape = g.shapes.get(node.output[0])
            if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
                continue
            n = math.prod(w.shape[2:])
            flat = np.asarray(w, np.float64).reshape(w.shape[0] * w.shape[1], n) ** 2
            total = max(float(flat.sum()), 1e-30)
            energy = np.array([np.max(flat @ library(w.shape[2:], k).masks.T.astype(np.float64), axis=1).sum()
                               / total if k < n else 1.0 for k in range(1, 7)])
            self.layers.append(PatternLayer(node.name, node.input[1], n, w.shape[0] * w.shape[1],
                                            shape[0] * math.prod(shape[2:]), energy))
        if not self.layers:
            raise SpaError("the pattern search found no convolution with a kernel of more than one position")
        self.total = int(problem.analysis.total_macs)
        self.other = self.total - sum(lay.dense_macs for lay in self.layers)
        self.budget = target_flops * self.total
        self.target = target_flops

    def macs(self, k, empty) -> int:
        return self.other + sum(lay.positions * (lay.kernels - int(e)) * int(kk)
                                for lay, kk, e in zip(self.layers, k, empty))

    def assign(self, levels) -> Assignment:
        """The assignment of one level per layer, projected onto the budget (module docstring)."""
        k = np.array([lay.k_of(int(lv)) for lay, lv in zip(self.layers, levels)], np.int64)
        kernels = np.array([lay.kernels for lay in self.layers], np.int64)

        def empty_at(c):
            return np.minimum(np.floor(c * kernels + 1e-9).astype(np.int64), kernels - 1)

        empty = np.zeros(len(k), np.int64)
        if self.macs(k, empty) > self.budget:
            lo, hi = 0.0, 1.0
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if self.macs(k, empty_at(mid)) <= self.budget else (mid, hi)
            empty = empty_at(hi)
            used = self.macs(k, empty)
            for i, lay in enumerate(self.layers):     # give kernels back while the budget holds
                back = min(int(empty[i]), int((self.budget - used) // (lay.positions * k[i])))
                if back > 0:
                    empty[i] -= back
                    used += back * lay.positions * int(k[i])
        macs = self.macs(k, empty)
        return Assignment(k, empty, macs, macs <= self.budget)

    def uniform_levels(self) -> list[int]:
        """Level indices a uniform assignment can use (K = 1..6 or dense)."""
        return list(range(len(LEVELS)))

    def layer_features(self) -> np.ndarray:
        """Per layer: MAC share, log2 positions / 4, energy kept at K = 1..6 (the pattern information)."""
        return np.array([[lay.dense_macs / self.total, math.log2(lay.n) / 4, *lay.energy] for lay in self.layers],
                        np.float32)


# ---- scoring ---------------------------------------------------------------------------------------------------------
class PatternRefit(LayerRefit):
    """LayerRefit whose per-layer solve does what the pattern path's reconstruction does (passes/reconstruct.py):
    the conv's shapes chosen again by OBS error on its actual input's Gram, from its dense weight (same K, same
    count of kernels emptied), then each output row refit on its kept positions. `patterns`: node name ->
    spa.patterns.LayerPattern of the candidate being scored."""

    patterns: dict

    def solve(self, name, view, h, xy, w_p, damp):
        lp = self.patterns.get(name)
        if lp is None:
            return super().solve(name, view, h, xy, w_p, damp)
        gram = SimpleNamespace(xx=h, xy=xy, n=1)
        if self.obs_choice and lp.dense is not None:
            mask = choose_by_obs(lp, gram, damp)
            w_p = w_p.copy()
            w_p[:, :mask[0].size] = view.matrix(np.where(mask, lp.dense, 0))
        return refit_masked(w_p, gram, damp, refit_support(view, lp.mask))


class PatternEvaluator(CalibEvaluator):
    """CalibEvaluator over pattern assignments: `evaluator(assignment.key())`; metrics gain `flops` = pattern-aware
    MACs kept. refit: "fast" (masked, default) or False (masks only). metric "auto": kl for class logits (top-1
    accuracy on a quarter of 128 samples is 100 % for most candidates), else rel_l2."""

    def __init__(self, problem: SearchProblem, space: PatternSpace, *, refit="fast", obs_choice: bool = True,
                 **options):
        if refit not in ("fast", False):
            raise SpaError(f"the pattern search scores with refit 'fast' or none, got {refit!r}")
        super().__init__(problem, refit=refit, **options)
        if options.get("metric", "auto") == "auto" and self.metric == "accuracy":
            self.metric = "kl"    # accuracy on the held-out samples saturates (docs/patterns.md): rank by KL
        self.space = space
        old = self._layer_refit
        self._layer_refit = PatternRefit(old.mode, old.positions, old.max_columns, old.damp)
        self._layer_refit.layers, self._layer_refit.skipped = old.layers, old.skipped
        self._layer_refit.patterns = {}
        self._layer_refit.obs_choice = obs_choice

    def measure(self, key) -> dict:
        teacher = self.teacher()
        t0 = time.perf_counter()
        key = np.asarray(key, np.int64).reshape(-1, 2)
        per_layer = {lay.name: (int(k), int(e) / lay.kernels) for lay, (k, e) in zip(self.space.layers, key)}
        model = self.problem.clone()
        layers = apply_patterns(model.graph, LARGEST_PATTERN, per_layer=per_layer)
        t1 = time.perf_counter()
        if self.fast_refit:
            self._layer_refit.patterns = layers
            info: dict = {}
            outputs = candidate_pass(model, {}, self.samples, self._moments, self._layer_refit, recalibrate=False,
                                     refit_info=info)
        else:
            outputs = self._run_ort(model.graph.to_model(), self.score_slice, own=True)
        t2 = time.perf_counter()
        metrics = compare(teacher, outputs, self.labels)
        macs = self.space.macs(key[:, 0], key[:, 1])
        metrics.update({"flops": macs / self.space.total, "params": 1.0, "apply_s": t1 - t0, "run_s": t2 - t1,
                        "seconds": t2 - t0})
        return metrics


# ---- the search ------------------------------------------------------------------------------------------------------
@dataclass
class PatternHistory:
    """Every evaluation: (index, reward, best so far), the assignments, the best one and the search's meta."""

    rows: list = field(default_factory=list)
    assignments: list = field(default_factory=list)
    best: int | None = None
    meta: dict = field(default_factory=dict)
    problem: SearchProblem | None = None


class PatternSearch:
    """The evaluation loop the policies drive: `evaluate(levels)` projects, scores and logs one candidate."""

    def __init__(self, space: PatternSpace, evaluator: PatternEvaluator, progress=None):
        self.space, self.evaluator, self.progress = space, evaluator, progress
        self.history = PatternHistory()
        self.rewards: list[float] = []
        self.metrics: list[dict] = []

    @property
    def evaluations(self) -> int:
        return len(self.rewards)

    def evaluate(self, levels) -> tuple[float, dict, Assignment]:
        a = self.space.assign(levels)
        ev = self.evaluator(a.key())
        i = self.evaluations
        self.rewards.append(ev.reward)
        self.metrics.append(ev.metrics)
        h = self.history
        h.assignments.append(a)
        if h.best is None or ev.reward > self.rewards[h.best]:
            h.best = i
        h.rows.append((i, ev.reward, self.rewards[h.best]))
        if self.progress is not None:
            self.progress(i, ev.reward, self.rewards[h.best])
        return ev.reward, ev.metrics, a


def pattern_policy(name: str):
    """Register a pattern-search policy `fn(run, problem, evals, seed, **options) -> info dict` (a decorator)."""
    def add(fn):
        PATTERN_POLICIES[name] = fn
        return fn
    return add


@pattern_policy("uniform")
def uniform_search(run: PatternSearch, problem, evals: int, seed: int = 0) -> dict:
    """Every layer the same K (each level in turn, projected onto the budget), as many as `evals` allows."""
    order = sorted(run.space.uniform_levels(), key=lambda lv: _uniform_rank(run.space, lv))
    for lv in order[:evals]:
        run.evaluate([lv] * len(run.space.layers))
    return {}


def _uniform_rank(space: PatternSpace, level: int) -> tuple:
    """Uniform levels by how few kernels they must empty to meet the budget (most promising first)."""
    a = space.assign([level] * len(space.layers))
    return (int(a.empty.sum()), -level)


@pattern_policy("random")
def random_search(run: PatternSearch, problem, evals: int, seed: int = 0) -> dict:
    """Each layer an independent uniformly drawn level, projected onto the budget."""
    rng = np.random.default_rng(seed)
    for _ in range(evals):
        run.evaluate(rng.integers(0, len(LEVELS), len(run.space.layers)))
    return {}


def search_patterns(model_path, *, target_flops: float, policy: str = "ppo-gnn", calib=None, evals: int = 64,
                    seed: int = 0, metric: str = "auto", refit="fast", score_split: float | None = 0.25,
                    input_shapes: dict | None = None, calib_samples: int | None = None, threads: int | None = 1,
                    policy_options: dict | None = None, progress=None, problem: SearchProblem | None = None,
                    obs_choice: bool = True) -> tuple[dict, PatternHistory]:
    """Search K per patterned conv under `target_flops` (pattern-aware MACs kept) with `policy` in `evals`
    evaluations. Returns the best assignment (node name -> (K, connectivity)) and the history."""
    if policy not in PATTERN_POLICIES:
        raise SpaError(f"unknown pattern-search policy '{policy}' (choose from {', '.join(sorted(PATTERN_POLICIES))})")
    if evals < 1:
        raise SpaError(f"evals must be at least 1, got {evals}")
    t0 = time.perf_counter()
    if problem is None:
        problem = SearchProblem.build(model_path, target_flops=1.0, calib=calib, calib_samples=calib_samples,
                                      input_shapes=input_shapes, seed=seed, threads=threads)
    space = PatternSpace(problem, target_flops)
    evaluator = PatternEvaluator(problem, space, refit=refit, metric=metric, score_split=score_split,
                                 threads=threads, seed=seed, obs_choice=obs_choice)
    run = PatternSearch(space, evaluator, progress)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    info = PATTERN_POLICIES[policy](run, problem, evals, seed, **(policy_options or {}))
    h = run.history
    best = h.assignments[h.best]
    h.meta = {"policy": policy, "policy_options": dict(policy_options or {}), "target_flops": target_flops,
              "evaluations": run.evaluations, "measured": evaluator.measured, "best_index": h.best,
              "best_reward": run.rewards[h.best], "metric": evaluator.metric, "metrics": run.metrics[h.best],
              "refit": refit or "none", "pattern_aware_macs": best.macs, "macs_total": space.total,
              "pattern_aware_ratio": best.macs / space.total, "feasible": best.feasible,
              "assignment": {lay.name: {"k": int(k), "kernels_emptied": int(e), "kernels": lay.kernels}
                             for lay, k, e in zip(space.layers, best.k, best.empty)},
              "history": [list(r) for r in h.rows], "seed": seed, "setup_s": round(setup, 3),
              "search_s": round(time.perf_counter() - t1, 3), "measure_s": round(evaluator.seconds, 3), **info}
    h.problem = problem
    return best.per_layer(space), h


def prune_with_patterns(model_path, output, assignment: dict, **driver_kwargs):
    """The driver's pattern path (masks, checks, refit, report) with a searched assignment."""
    # K for any conv the assignment does not list: the largest, which leaves every kernel up to 5x5 dense
    return driver.prune(model_path, output, patterns=LARGEST_PATTERN, pattern_assignment=dict(assignment),
                        **driver_kwargs)
