"""Passes over the IR. A pass has one job, declares whether it rewrites the graph, and returns what it found.

Analyses are cached on the model by the pass manager and dropped when a rewriting pass runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


class Pass:
    name = "pass"
    rewrites = False  # a rewriting pass invalidates every cached analysis

    def run(self, model, **kw):  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class PassManager:
    passes: list
    timings: dict = field(default_factory=dict)
    progress: object = None

    def run(self, model):
        results = {}
        for p in self.passes:
            if self.progress:
                self.progress(p.name)
            t = time.perf_counter()
            results[p.name] = p.run(model)
            self.timings[p.name] = time.perf_counter() - t
            if p.rewrites:
                model.analyses.clear()
        return results
