"""Analysis: one topological sweep of the operator rules, then coupled groups and costs."""
from __future__ import annotations

from spa import operators
from spa.errors import SpaError, one_line
from spa.groups import Analysis, build_groups
from spa.ir import has_subgraph, subgraph_free_names
from spa.labels import Context
from spa.operators.shape import follow_shape_values

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
        unruled: dict[str, int] = {}
        nodes = list(g.model.graph.node)
        for node in nodes:
            implicit = subgraph_free_names(node) if has_subgraph(node) else set()
            fn = None if implicit else operators.lookup(node.op_type, node.domain)
            if fn is not None:
                try:
                    fn(ctx, node)
                    follow_shape_values(ctx, node)
                except (IndexError, ValueError, TypeError, ZeroDivisionError, KeyError) as e:
                    # a rule met a node that breaks its operator's contract (a bad perm, a Reshape target that
                    # does not fit, a missing input): the input is malformed, say where
                    raise SpaError(f"the input model is invalid: node '{node.name or node.output[0]}' "
                                   f"({node.op_type}): {type(e).__name__}: {one_line(e, 200)}") from e
                continue
            follow_shape_values(ctx, node, implicit)
            touched = [x for x in [*node.input, *implicit] if x in ctx.labels]
            if touched:
                op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
                why = "control flow reads it in a subgraph" if implicit else "no propagation rule for this operator"
                for x in touched:
                    ctx.freeze(ctx.labels[x], node, why)
                unruled[op] = unruled.get(op, 0) + 1
        for name in g.output_names:
            if name in ctx.labels:
                ctx.freeze(ctx.labels[name], f"graph output '{name}'", "reaches a graph output (its shape is fixed)")
            for v in ctx.shape_values.get(name, ()):
                if getattr(v, "atoms", None) is not None:
                    ctx.freeze(v.atoms, f"graph output '{name}'", "a channel count read at run time is a graph output")
        groups, unit_group, unit_macs = build_groups(ctx)
        total = sum(c.macs for c in ctx.costs.values())
        result = Analysis(ctx, groups, unit_group, unit_macs, total, len(nodes), unruled,
                          nodes=nodes, node_index={id(n): i for i, n in enumerate(nodes)})
        model.analyses[self.name] = result
        return result
