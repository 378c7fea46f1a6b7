"""Control flow: the rules run inside If branches and Loop/Scan bodies.

Names are unique model-wide (normalization renames what sibling bodies share), so a body node reads the labels of
the outer-scope tensors it uses from the same context, and a branch's own Conv/Gemm/MatMul weights are sources
like the main graph's: their slices are cut inside the body, and shape constants inside bodies are rewritten as
in the main graph.

- If: both branches are swept. Output i of the If carries the unification of the branches' outputs i (a group
  whose channels reach an If output is one group in both branches, cut identically); a branch that gives no
  channels there, or a different layout, freezes the other's. Channel counts read at run time (Shape) that leave
  a branch are frozen.
- Loop, Scan: a body runs once per iteration, and a value that crosses iterations must keep its width: labelled
  loop-carried initial values and scan inputs, and every labelled body output (carried values, scan outputs), are
  frozen ("loop-carried value of a Loop body"). What stays inside one iteration prunes: a hidden width of an MLP
  in the body, an outer tensor read by a body's weight layer (the same tensor every iteration).

`sweep` is the analysis's one topological sweep of the rules over a list of nodes (the main graph's, or a body's).
"""
from __future__ import annotations

from spa.errors import SpaError, one_line
from spa.ir import attr, has_subgraph, subgraph_free_names
from spa.labels import Labels

from .registry import lookup, rule
from .shape import follow_shape_values, is_count


def sweep(ctx, nodes) -> None:
    """Run each node's rule in order; a node without one freezes every channel that reaches it (counted in
    `ctx.unruled` by op type)."""
    for node in nodes:
        fn = lookup(node.op_type, node.domain)
        implicit = subgraph_free_names(node) if has_subgraph(node) and fn is None else set()
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
            ctx.unruled[op] = ctx.unruled.get(op, 0) + 1


def _leaving_counts(ctx, body, node, why: str) -> None:
    """Channel counts read at run time (Shape) that a body gives out: frozen (the If/Loop output is opaque to the
    shape-read rules)."""
    for o in body.output:
        for v in ctx.shape_values.get(o.name, ()):
            if is_count(v):
                ctx.freeze(v.atoms, node, why)


def _resize_output_decl(ctx, body, i: int, labels: Labels) -> None:
    """The declared dim of a body output on its labelled axis follows the kept count (onnx.checker's full check
    and onnxruntime read a body's declared output shapes)."""
    vi = body.output[i]

    def resize(ap, vi=vi, axis=labels.axis, atoms=labels.atoms):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and axis < len(dims) and dims[axis].HasField("dim_value"):
            dims[axis].dim_value = ap.kept(atoms)

    ctx.edit(resize)


@rule("If")
def if_rule(ctx, node):
    cond = ctx.inp(node, 0)
    ctx.freeze(cond, node, "If condition")
    then_b, else_b = _branch(node, "then_branch"), _branch(node, "else_branch")
    if then_b is None or else_b is None:
        ctx.freeze_inputs(node, "If without both branches")
        return
    for b in (then_b, else_b):
        sweep(ctx, b.node)
        _leaving_counts(ctx, b, node, "a channel count read at run time (Shape) leaves an If branch")
    for i in range(min(len(node.output), len(then_b.output), len(else_b.output))):
        a, b = ctx.labels.get(then_b.output[i].name), ctx.labels.get(else_b.output[i].name)
        if a is None and b is None:
            continue
        if a is None or b is None or a.axis != b.axis or len(a) != len(b):
            why = (f"If output {i}: one branch gives channels the other does not" if a is None or b is None else
                   f"If output {i}: the branches carry channels on different axes or widths")
            ctx.freeze(a, node, why)
            ctx.freeze(b, node, why)
            continue
        atoms = ctx.unify(a.atoms, b.atoms, node, f"If output {i}: a channel meets an unprunable position of the "
                                                   "other branch")
        ctx.out(node, i, Labels(a.axis, atoms))
        _resize_output_decl(ctx, then_b, i, a)
        _resize_output_decl(ctx, else_b, i, b)


def _branch(node, name: str):
    for a in node.attribute:
        if a.name == name and a.HasField("g"):
            return a.g
    return None


@rule("Loop", "Scan")
def loop_rule(ctx, node):
    reason = f"loop-carried value of a {node.op_type} body"
    scanned = int(attr(node, "num_scan_inputs", 0)) if node.op_type == "Scan" else 0
    explicit = list(node.input[2:] if node.op_type == "Loop" else node.input)
    n_state = len(explicit) - scanned
    for k, x in enumerate(explicit):
        why = reason if k < n_state else "scan input of a Scan body (sliced per iteration)"
        ctx.freeze(ctx.labels.get(x), node, why)
    if node.op_type == "Loop":
        for x in node.input[:2]:
            ctx.freeze(ctx.labels.get(x), node, "Loop trip count or condition")
    body = _branch(node, "body")
    if body is None:
        return
    sweep(ctx, body.node)
    _leaving_counts(ctx, body, node, f"a channel count read at run time (Shape) leaves a {node.op_type} body")
    first = 1 if node.op_type == "Loop" else 0  # a Loop body's output 0 is its condition
    for k, o in enumerate(body.output):
        lab = ctx.labels.get(o.name)
        if lab is None:
            continue
        j = k - first
        why = reason if 0 <= j < n_state else (
            f"scan output of a {node.op_type} body (stacked across iterations)" if j >= 0 else "Loop condition")
        ctx.freeze(lab, node, why)
