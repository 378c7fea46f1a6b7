"""Analysis: one topological sweep of the operator rules, then coupled groups and costs."""
from __future__ import annotations

from spa.groups import Analysis, build_groups
from spa.ir import walk_nodes
from spa.labels import Context
from spa.operators import control

from . import Pass


class Analyse(Pass):
    name = "analyse"

    def __init__(self, options: dict | None = None):
        self.options = options or {}

    def run(self, model) -> Analysis:
        cached = model.analyses.get(self.name)
        if cached is not None:
            return cached
        g = model.graph
        ctx = Context(g, options={"opset": model.opset, **self.options})
        nodes = list(g.model.graph.node)
        control.sweep(ctx, nodes)
        for name in g.output_names:
            if name in ctx.labels:
                ctx.freeze(ctx.labels[name], f"graph output '{name}'", "reaches a graph output (its shape is fixed)")
            for v in ctx.shape_values.get(name, ()):
                if getattr(v, "atoms", None) is not None:
                    ctx.freeze(v.atoms, f"graph output '{name}'", "a channel count read at run time is a graph output")
        groups, unit_group, unit_macs = build_groups(ctx)
        total = sum(c.macs for c in ctx.costs.values())
        every = [n for n, _ in walk_nodes(g.model.graph)]  # bodies' nodes too: verification finds them by index
        result = Analysis(ctx, groups, unit_group, unit_macs, total, len(nodes), ctx.unruled,
                          nodes=nodes, node_index={id(n): i for i, n in enumerate(every)}, walked=every)
        model.analyses[self.name] = result
        return result
