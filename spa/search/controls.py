"""Controls: the baselines every learned policy must beat under the same evaluation budget.

* `uniform` - the same keep ratio for every group, projected onto the budget (1 evaluation);
* `global` - spa's default `--target-flops` allocation: units ranked globally by magnitude (l2) per MAC
  (`spa.select`, allocation 'global'); its per-group counts are projected onto the budget (1 evaluation);
* `lamp` - the same with LAMP scores (layer-adaptive magnitude, comparable across groups as they are);
* `random` - EagleEye-style random search: keep ratios drawn uniformly in [low, high] per group, projected onto
  the budget, each evaluated (re-calibrated when the evaluator re-calibrates), the best kept (`evals` evaluations,
  submitted as one batch: in parallel with `executor="ray"`).

The allocations of `global` and `lamp` decide only how many units each group keeps; which units go is always the
problem's criterion, as for every other policy, so the comparison is between allocations.
"""
from __future__ import annotations

import numpy as np

from ..importance import score
from ..select import select
from .policy import Policy, SearchResult, register_policy


@register_policy("uniform")
class UniformPolicy(Policy):
    def search(self, env, evals: int, seed: int = 0) -> SearchResult:
        env.evaluate_ratios(np.full(len(env.action_groups), 0.5))
        return SearchResult.from_env(env, policy="uniform")


class _RankingPolicy(Policy):
    """Allocation from spa.select's global ranking (importance per MAC) at the budget's fraction."""

    importance = "l2"
    normalization = "mean"

    def search(self, env, evals: int, seed: int = 0) -> SearchResult:
        p = env.problem
        opts = p.options
        scores = score(p.analysis, self.options.get("importance", self.importance), "sum",
                       self.options.get("normalization", self.normalization))
        # the MACs fraction of the ranking only seeds the allocation; the projection meets the real budget(s)
        target = p.budgets.get("flops", p.budgets.get("params", p.budgets.get("latency")))
        plan = select(p.analysis, scores, target_flops=target, min_channels=opts.get("min_channels", 1),
                      round_to=opts.get("round_to", 1), exclude=opts.get("exclude") or None,
                      max_ratio=opts.get("max_ratio", 1.0), allocation="global")
        kept = env.projector.kept_of_plan(plan)
        ratios = kept[env.action_groups] / env.projector.sizes[env.action_groups]
        env.evaluate_ratios(ratios)
        return SearchResult.from_env(env, policy=self.name)


@register_policy("global")
class GlobalPolicy(_RankingPolicy):
    importance, normalization = "l2", "mean"


@register_policy("lamp")
class LampPolicy(_RankingPolicy):
    importance, normalization = "lamp", "none"


@register_policy("random")
class RandomPolicy(Policy):
    """options: low, high (keep-ratio range, default 0.0-1.0)."""

    def search(self, env, evals: int, seed: int = 0) -> SearchResult:
        rng = np.random.default_rng(seed)
        low, high = float(self.options.get("low", 0.0)), float(self.options.get("high", 1.0))
        n, pj = len(env.action_groups), env.projector
        # every draw is independent of the rewards: one batch (in parallel on a Ray cluster), drawn lazily in the
        # order a loop would draw them
        env.evaluate_many(pj.project(rng.uniform(low, high, n)).kept for _ in range(evals - env.evaluations))
        return SearchResult.from_env(env, policy="random")
