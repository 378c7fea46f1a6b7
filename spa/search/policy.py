"""One interface for every search policy: RL agents and the controls they are compared with.

A policy is a class with a `search(env, evals, seed)` method; it spends at most `evals` evaluations (calls of
`env.evaluate` / `env.evaluate_ratios`, or episodes of `env.step`, each one candidate - a cached candidate still
counts) and returns a `SearchResult`. The env logs every evaluation, so a policy usually ends with
`return SearchResult.from_env(env)` (the best candidate and the history).

    from spa.search import Policy, register_policy, SearchResult

    @register_policy("my-net")
    class MyPolicy(Policy):
        mode = "one-shot"                      # the env mode it needs (or "sequential")

        def search(self, env, evals, seed=0):
            rng = np.random.default_rng(seed)
            obs, _ = env.reset(seed=seed)
            while env.evaluations < evals:
                action = my_network(obs)       # shape env.action_space.shape, values in [-1, 1]
                obs, reward, done, _, info = env.step(action)
                if done:
                    obs, _ = env.reset()
            return SearchResult.from_env(env)

`register_policy(name, cls)` (or as a decorator) makes it available to `spa.search.search(..., policy=name)`;
constructor keywords come from `policy_options`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import SpaError
from ..select import PruningPlan


@dataclass
class SearchResult:
    plan: PruningPlan
    kept: np.ndarray                     # kept units per group (index = group id)
    reward: float
    history: list[tuple[int, float, float]]   # (evaluation index, reward, best reward so far)
    info: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, env, **info) -> SearchResult:
        if env.best is None:
            raise SpaError("the policy evaluated no candidate")
        best = env.best
        return cls(env.plan(best.kept), best.kept.copy(), best.reward, list(env.history),
                   {"best_index": best.index, "metrics": best.evaluation.metrics,
                    "costs": env.projector.costs(best.kept), **info})


class Policy:
    """Base class. `mode` names the env mode the policy drives; options arrive as constructor keywords."""

    name: ClassVar[str] = ""
    mode: ClassVar[str] = "one-shot"

    def __init__(self, **options):
        self.options = options

    def search(self, env, evals: int, seed: int = 0) -> SearchResult:  # pragma: no cover - interface
        raise NotImplementedError


POLICIES: dict[str, type[Policy]] = {}


def register_policy(name: str, cls: type[Policy] | None = None):
    """Register `cls` under `name` (replacing an earlier registration); usable as a decorator."""
    def add(c: type[Policy]) -> type[Policy]:
        if not (isinstance(c, type) and hasattr(c, "search")):
            raise SpaError(f"policy '{name}' must be a class with a search(env, evals, seed) method")
        POLICIES[name] = c
        if not c.__dict__.get("name"):   # a subclass of a registered policy gets its own name
            c.name = name
        return c

    return add(cls) if cls is not None else add


def get_policy(name: str) -> type[Policy]:
    cls = POLICIES.get(name)
    if cls is None:
        raise SpaError(f"unknown policy '{name}' (registered: {', '.join(sorted(POLICIES))})")
    return cls
