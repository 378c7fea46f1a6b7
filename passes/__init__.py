"""Passes over the IR. A pass has one job, declares what it needs and what it provides, whether it rewrites the
graph, and returns what it found.

The pass manager runs a list of passes in order, checks each pass's `requires` against what the passes before
it `provide` (a pipeline that reads something nobody made fails before any work), times every pass, and drops
the target's cached analyses after a pass that rewrites the graph: callers never clear them by hand.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class PassResult:
    """What a pipeline pass returns: whether it changed the graph, its part of the run's report, and whether it
    found nothing to do on this model (it then has no line in the timings)."""

    modified: bool = False
    report: dict = field(default_factory=dict)
    skipped: bool = False


class Pass:
    name = "pass"
    rewrites = False          # a rewriting pass invalidates every cached analysis
    requires: tuple = ()      # names the passes before it must provide
    provides: tuple = ()      # names it makes available to the passes after it

    def run(self, target, **kw):  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class PassManager:
    passes: list
    timings: dict = field(default_factory=dict)
    progress: object = None
    available: tuple = ()     # names the target already provides before the first pass

    def run(self, target):
        self.check_order()
        return {p.name: self.run_one(p, target) for p in self.passes}

    def run_one(self, p: Pass, target) -> PassResult:
        """One pass, timed, the target's analyses dropped after it if it rewrites (also used to append a pass
        to a finished run, e.g. the writing of the run a fidelity guard chose)."""
        if self.progress:
            self.progress(p.name)
        t = time.perf_counter()
        result = p.run(target)
        if not getattr(result, "skipped", False):
            self.timings[p.name] = time.perf_counter() - t
        if p.rewrites:
            target.analyses.clear()
        return result

    def check_order(self) -> None:
        """Every pass's requirements are provided by the passes before it (a programming error otherwise)."""
        have = set(self.available)
        for p in self.passes:
            missing = [r for r in p.requires if r not in have]
            if missing:
                raise RuntimeError(f"pass '{p.name}' requires {missing}, which no earlier pass provides")
            have.update(p.provides)
