"""Normalization: make any exporter's graph look the same to the rules.

Lifts Constant nodes to initializers, removes Identity aliases, folds constant subgraphs (shape arithmetic,
weight transposes, fills), drops dead nodes and initializers, fixes IR/opset for onnxruntime, and infers the
static shapes the rules and the cost model read. All of it is exact: the folded graph computes the same values.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, version_converter

from spa import quant
from spa.errors import SpaError, VerificationError, one_line
from spa.ir import MAX_IR_VERSION, MAX_OPSET, Graph, attr, static_dims, subgraphs, walk_graphs, walk_nodes
from spa.model import default_dim
from spa.validate import MAX_ANALYSIS_ELEMENTS, check_elements, check_parameters, run_checker

from . import Pass, verify
from .fold import FOLDERS, constant_node_value, evaluate
from .qdq import has_integer_kernels, integer_kernels_to_qdq
from .unfuse import has_fusions, unfuse_contrib

# The QDQ form requantizes on the float path, and onnxruntime's integer kernels round differently at ties: a
# quantized ResNet-20's logits differed by 0-0.6 % (relative L2) on random draws, at every optimization level.
# A wrong operand (axis, bias scale, zero point) shows as an error of order 1.
QDQ_RTOL = 0.05
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def fix_versions(model: onnx.ModelProto) -> list[str]:
    """Bring IR/opset within what onnxruntime 1.31 runs, or raise a clear error."""
    notes = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > MAX_OPSET:
        try:
            converted = version_converter.convert_version(model, MAX_OPSET)
        except Exception as e:
            raise SpaError(f"model uses opset {opset} (onnxruntime runs <= {MAX_OPSET}) and onnx's version "
                           f"converter cannot convert it down: {str(e).splitlines()[0][:200]}")
        model.CopyFrom(converted)
        notes.append(f"converted opset {opset} -> {MAX_OPSET}")
    if model.ir_version > MAX_IR_VERSION:
        notes.append(f"IR version {model.ir_version} -> {MAX_IR_VERSION}")
        model.ir_version = MAX_IR_VERSION
    return notes


class Normalize(Pass):
    name = "normalize"
    rewrites = True

    def __init__(self, input_shapes: dict | None = None, max_elements: int = MAX_ANALYSIS_ELEMENTS,
                 qdq: bool = False):
        self.input_shapes = input_shapes or {}
        self.max_elements = max_elements  # per analysed tensor (--memory-limit)
        self.qdq = qdq                    # integer kernels in QDQ form: the data passes will run

    def unfuse(self, model) -> dict[str, int]:
        """passes/unfuse.py's rewrite of the contrib fusions, checked (`checked_rewrite`); where it cannot be
        used the fusions stay as the file has them (what they touch freezes)."""
        if not has_fusions(model.graph):
            return {}
        return self.checked_rewrite(model, unfuse_contrib, lambda ops, why: (
            f"onnxruntime's contrib fusions ({ops}) were left as the file has them: {why}; what they touch is "
            f"frozen"))

    def integer_kernels(self, model) -> dict[str, int]:
        """passes/qdq.py's rewrite of integer kernels in QDQ form (for the data passes), checked; where it cannot
        be used they stay as the file has them (ranked by magnitude, not refit)."""
        if not self.qdq or not has_integer_kernels(model.graph):
            return {}
        dynamic: set[str] = set()
        model.dynamic_as_qdq = dynamic   # passes/qdq.dynamic_kernels_back writes them back after the refit
        return self.checked_rewrite(model, lambda g: integer_kernels_to_qdq(g, dynamic), lambda ops, why: (
            f"the integer kernels ({ops}) were left as the file has them: {why}; they are ranked by magnitude "
            f"and not refit"), rtol=QDQ_RTOL)

    def checked_rewrite(self, model, rewrite, warning, rtol: float = 1e-4) -> dict[str, int]:
        """Apply `rewrite(graph) -> {op: count}` and check it like a pruned model: verification later compares
        the pruned model with the normalized original, so a rewrite that changed the computation would pass
        there unseen. The rewritten graph is compared with the graph as given, in onnxruntime on random inputs
        (verify.compare: two draws, every If branch); where it differs or cannot be compared, the graph as given
        comes back and `warning(ops, why)` is added."""
        given = onnx.ModelProto()
        given.CopyFrom(model.graph.model)
        done = rewrite(model.graph)
        if not done:
            return {}
        try:
            shapes, _ = analysis_input_shapes(model.graph, self.input_shapes, self.max_elements)
            verify.compare(given, model.graph.to_model(), shapes, rtol=rtol, pinned=tuple(self.input_shapes))
            return done
        except VerificationError as e:
            why = f"rewritten they did not compute the same ({one_line(e, 200)})"
        except SpaError as e:   # the file as given does not run at these shapes: nothing to compare with
            why = f"the rewrite could not be compared with the file as given ({one_line(e, 200)})"
        model.graph = Graph(given)
        model.warnings.append(warning(", ".join(sorted(done)), why))
        return {}

    def run(self, model):
        report = {"versions": fix_versions(model.graph.model)}
        if report["versions"]:
            model.graph = Graph(model.graph.model)  # the converter replaced the protobuf's contents
        g: Graph = model.graph
        if not any(t.data_type in FLOAT_TYPES for b in walk_graphs(g.model.graph) for t in b.initializer) and \
                not any(_is_float_const(n) for n, _ in walk_nodes(g.model.graph)):
            raise SpaError(weights_out_of_reach(g.model) or "model has no floating-point weights (an integer-only "
                           "model, or no weights at all): nothing to prune")
        report["initializer_inputs_dropped"] = drop_initializer_inputs(g)
        unfused = self.unfuse(model)   # onnxruntime's saved fusions: standard ops again, checked
        g = model.graph
        report["contrib_fusions_unfused"] = sum(unfused.values())
        report["contrib_fusions_by_op"] = unfused
        report["integer_kernels_as_qdq"] = self.integer_kernels(model)
        g = model.graph
        report["names_renamed"] = unique_names(g)
        report["lifted_constants"] = lift_constants(g)
        report["identities_removed"] = remove_identities(g)
        check_parameters(g)  # weights are initializers now: their rank, sizes and group, before any rule reads them
        g.shapes, g.dtypes = infer_shapes(g, fixed=None)
        report["folded_nodes"] = fold_constants(g)
        report["shape_reads_split"] = split_shape_reads(g)
        report["dead_nodes_removed"] = dead_code(g)
        model.input_shapes, warnings = analysis_input_shapes(g, self.input_shapes, self.max_elements)
        model.warnings.extend(warnings)
        declared = {name: g.shapes.get(name) for name in model.input_shapes}
        # static inputs and nothing folded: the first inference is final
        if declared != model.input_shapes or report["folded_nodes"] or report["dead_nodes_removed"] \
                or report["shape_reads_split"]:
            g.shapes, g.dtypes = infer_shapes(g, fixed=model.input_shapes)
        for name, shape in g.shapes.items():  # what verification would materialise: bounded before it runs
            if name not in model.input_shapes and shape is not None:
                check_elements(shape, f"tensor '{name}' (inferred)", self.max_elements)
        model.normalize_report = report
        return report


def _is_float_const(n) -> bool:
    if n.op_type != "Constant":
        return False
    v = constant_node_value(n)
    return v is not None and v.dtype.kind == "f"


# quantized operators no rule takes as a source yet (QLinearConv, ConvInteger, QDQ weights, ...: operators/quantized.py)
QUANTIZED_OPS = ("MatMulNBits", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM")


def weights_out_of_reach(model: onnx.ModelProto) -> str:
    """Where the weights are when the model has no prunable one, as one clause for the user: quantized operators
    without a rule (MatMulNBits, ...; QDQ weights and weights inside If/Loop/Scan bodies are sources). '' when the
    model holds none of these (then it has no weights to prune at all)."""
    g = model.graph
    found: Counter = Counter()
    for n in g.node:
        if n.op_type in QUANTIZED_OPS:
            found[(n.op_type, "(quantized)")] += 1
    if not found:
        return ""
    parts = [f"{count} {op} {what}" if count == 1 else
             f"{count} {op} nodes {what.replace('its ', 'their ').replace('a constant weight', 'constant weights')}"
             for (op, what), count in found.items()]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"no prunable float weights in the main graph: {listed}, which spa-prune does not prune yet"


def drop_initializer_inputs(g: Graph) -> int:
    """Initializers also listed as graph inputs (IR 3, keep_initializers_as_inputs) are weights to us; their
    input entries would keep stale shapes after pruning. IR 3 requires the listing, so such models move to IR 4."""
    inits = set(g.initializer_names())
    keep = [vi for vi in g.model.graph.input if vi.name not in inits]
    dropped = len(g.model.graph.input) - len(keep)
    if dropped:
        del g.model.graph.input[:]
        g.model.graph.input.extend(keep)
        g.model.ir_version = max(g.model.ir_version, 4)
    return dropped


def lift_constants(g: Graph) -> int:
    """Constant nodes become initializers of the graph that holds them (a branch's Constant weight stays in its
    branch)."""
    count = 0
    for body in list(walk_graphs(g.model.graph)):
        for n in list(body.node):
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                v = constant_node_value(n)
                if v is None:
                    continue
                body.node.remove(n)
                g.set_const(n.output[0], v, holder=body)
                if body is not g.model.graph:  # written now: inference's light copy carries bodies as they are
                    g.to_model_tensor(n.output[0])
                count += 1
    g.refresh()
    return count


def unique_names(g: Graph) -> int:
    """Rename what subgraphs define (body inputs, initializers, node outputs, node names) where the name is taken
    elsewhere in the model, so that every name is unique model-wide and the flat maps of spa.ir.Graph (and the
    rules, which look tensors up by name) see each body's own tensors. Sibling bodies may reuse names (an If's two
    branches often do); references in a body and in the bodies nested in it follow. A main-graph node name used
    twice (legal: node names are only diagnostic; silero-vad's OpenVINO export has 15 nodes 'F0::anon') gets a
    fresh one, and an unnamed node one after its op type, since --exclude, plans, the search and the data passes
    key nodes by name. Returns the names changed (not counting the unnamed nodes named)."""
    main = g.model.graph
    seen = {t.name for t in main.initializer} | {i.name for i in main.input}
    seen |= {o for n in main.node for o in n.output} | {n.name for n in main.node}
    count = 0

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in seen:
            name = f"{base}_{k}"
            k += 1
        seen.add(name)
        return name

    def scope(body: onnx.GraphProto, renamed: dict[str, str]) -> None:
        nonlocal count
        local = dict(renamed)
        defined = [i.name for i in body.input] + [t.name for t in body.initializer] + \
            [o for n in body.node for o in n.output if o]
        for name in defined:
            if name in seen:
                local[name] = fresh(name)
                count += 1
            else:
                seen.add(name)
        for vi in [*body.input, *body.output, *body.value_info]:
            vi.name = local.get(vi.name, vi.name)
        for t in body.initializer:
            t.name = local.get(t.name, t.name)
        for n in body.node:
            n.input[:] = [local.get(x, x) for x in n.input]
            n.output[:] = [local.get(x, x) for x in n.output]
            if not n.name or n.name in seen:
                n.name = fresh(n.name or f"{body.name or 'body'}_{n.op_type}")
            else:
                seen.add(n.name)
            for b in subgraphs(n):
                scope(b, local)

    node_names: set[str] = set()
    for n in main.node:
        if not n.name:  # unnamed (legal): the data passes key layers by node name, so two unnamed MatMuls collided
            n.name = fresh(n.op_type)
        elif n.name in node_names:
            n.name = fresh(n.name)
            count += 1
        node_names.add(n.name)
    for n in main.node:
        for b in subgraphs(n):
            scope(b, {})
    g.__post_init__()  # the maps again, with the new names
    return count


def remove_identities(g: Graph) -> int:
    outputs = set(g.output_names)
    count = 0
    for n in list(g.model.graph.node):
        if n.op_type != "Identity" or n.output[0] in outputs:
            continue
        src, dst = n.input[0], n.output[0]
        if any(idx < 0 for _, idx in g.consumers.get(dst, [])):
            continue  # read by a subgraph: leave the alias alone
        for c, idx in g.consumers.get(dst, []):
            c.input[idx] = src
        g.model.graph.node.remove(n)
        count += 1
        g.refresh()
    return count


BODY_FOLD_MAX_ELEMENTS = 64  # in If/Loop/Scan bodies only shape arithmetic is folded (pads, sizes): small values


def fold_constants(g: Graph) -> int:
    """Evaluate nodes whose inputs are all constants (and Shape reads of static dims) into initializers: in the
    main graph, and in If/Loop/Scan bodies where the value is small (a body's constant shape arithmetic, e.g.
    silero-vad's STFT padding, must fold for inference to see the body's shapes and the cost model its MACs).
    A body's value becomes that body's initializer, written at once (inference reads bodies as they are)."""
    outputs = set(g.output_names) | {o.name for b in walk_graphs(g.model.graph) for o in b.output}
    folded = 0
    for n, owner in list(walk_nodes(g.model.graph)):
        if any(o in outputs for o in n.output) or any(a.type == onnx.AttributeProto.GRAPH for a in n.attribute):
            continue
        if n.op_type == "Shape":
            vector = _shape_vector(g, n)
            if vector is None or (vector < 0).any():
                continue
            values = [vector]
        elif n.op_type in ("Gather", "Slice") and (picked := _static_shape_pick(g, n)) is not None:
            values = [picked]
        else:
            if not n.input or not all(g.is_const(x) for x in n.input if x) or n.op_type not in FOLDERS:
                continue
            ins = [g.const(x) if x else None for x in n.input]
            values = evaluate(n, ins)
            if values is None:
                continue
        in_body = owner is not g.model.graph
        if in_body and any(np.size(v) > BODY_FOLD_MAX_ELEMENTS for v in values):
            continue
        owner.node.remove(n)
        for name, v in zip(n.output, values):
            g.set_const(name, v, holder=owner if in_body else None)
            if in_body:
                g.to_model_tensor(name)
        folded += 1
    g.refresh()
    return folded


def split_shape_reads(g: Graph) -> int:
    """A Shape of a tensor with both static and dynamic dims becomes a Concat of its static dims (constants) and
    one Shape(start, end) per run of dynamic dims. Exact: the static dims are those the model declares (the fold
    above already does this for Shapes whose dims are all static). tf2onnx, jax2onnx and paddle2onnx flatten with
    a dynamic batch as Reshape(x, Concat(Gather/Slice(Shape(x), batch), [C*H*W])): the whole-tensor Shape would
    read (and freeze) the channel axis although only the batch is used at run time. Needs opset >= 15."""
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset < 15:
        return 0
    outputs = set(g.output_names)
    new_nodes, count = [], 0
    for n in g.model.graph.node:
        pieces = _shape_pieces(g, n) if n.op_type == "Shape" and n.output[0] not in outputs else None
        if pieces is None:
            new_nodes.append(n)
            continue
        names = []
        for lo, hi, static in pieces:
            if static is not None:
                names.append(g.add_const(np.array(static, dtype=np.int64), f"{n.output[0]}_static"))
            else:
                names.append(g.unique(f"{n.output[0]}_{lo}_{hi}"))
                new_nodes.append(helper.make_node("Shape", [n.input[0]], [names[-1]], name=g.unique(
                    f"{n.name or 'Shape'}_{lo}_{hi}"), start=lo, end=hi))
        new_nodes.append(helper.make_node("Concat", names, [n.output[0]], name=g.unique(f"{n.name or 'Shape'}_split"),
                                          axis=0))
        count += 1
    if count:
        del g.model.graph.node[:]
        g.model.graph.node.extend(new_nodes)
        g.refresh()
    return count


def _shape_pieces(g: Graph, n) -> list[tuple[int, int, list | None]] | None:
    """Runs (start, end, static dims or None) of the dims a Shape node returns, or None when they are all static,
    all dynamic, or the rank is unknown."""
    dims = g.shapes.get(n.input[0])
    if dims is None:
        return None
    rank = len(dims)
    start, end = attr(n, "start", 0), attr(n, "end", rank)
    start = max(start + rank if start < 0 else start, 0)
    end = min(end + rank if end < 0 else end, rank)
    static = [isinstance(d, int) and d >= 0 for d in dims]
    if start >= end or all(static[start:end]) or not any(static[start:end]):
        return None
    pieces, lo = [], start
    while lo < end:
        hi = lo
        while hi < end and static[hi] == static[lo]:
            hi += 1
        pieces.append((lo, hi, [int(d) for d in dims[lo:hi]] if static[lo] else None))
        lo = hi
    return pieces


def _shape_vector(g: Graph, shape_node) -> np.ndarray | None:
    """What a Shape node returns, from inferred shapes: -1 for each dynamic dim; None if the rank is unknown."""
    dims = g.shapes.get(shape_node.input[0])
    if dims is None:
        return None
    rank = len(dims)
    start, end = attr(shape_node, "start", 0), attr(shape_node, "end", rank)
    start = start + rank if start < 0 else start
    end = min(end + rank if end < 0 else end, rank)
    return np.array([d if isinstance(d, int) else -1 for d in dims[start:end]], dtype=np.int64)


def _static_shape_pick(g: Graph, n) -> np.ndarray | None:
    """Gather/Slice of a Shape whose picked dims are static (a dynamic batch elsewhere does not matter):
    the value exporters use for channel counts and head sizes, folded to its constant."""
    src = g.producer.get(n.input[0])
    if src is None or src.op_type != "Shape" or not all(g.is_const(x) for x in n.input[1:] if x):
        return None
    vector = _shape_vector(g, src)
    if vector is None:
        return None
    picked = evaluate(n, [vector, *[g.const(x) if x else None for x in n.input[1:]]])
    if picked is None or (picked[0] < 0).any():
        return None
    return picked[0]


def dead_code(g: Graph) -> int:
    outputs = set(g.output_names)
    removed = 0
    changed = True
    while changed:
        changed = False
        for n in reversed(list(g.model.graph.node)):
            if not any(o in outputs or g.consumers.get(o) for o in n.output if o):
                g.model.graph.node.remove(n)
                removed += 1
                changed = True
        g.refresh()
    graph_inputs = {i.name for i in g.model.graph.input}
    for name in g.initializer_names():
        if name not in g.consumers and name not in outputs and name not in graph_inputs:
            g.remove_initializer(name)
    return removed


def analysis_input_shapes(g: Graph, given: dict, max_elements: int = MAX_ANALYSIS_ELEMENTS
                          ) -> tuple[dict, list[str]]:
    """Static shapes for every graph input: --input-shape where given, declared dims, then documented defaults.
    A named dynamic dim (dim_param) is one size in every input that declares it: the size --input-shape gave it,
    else the batch default where it is some input's dim 0 (silero-vad's `state` holds the batch at dim 1)."""
    shapes, warnings = {}, []
    names = g.input_names
    for k in given:
        if k not in names:
            raise SpaError(f"--input-shape names '{k}', which is not a model input (inputs: {', '.join(names)})")
    declared = {vi.name: static_dims(vi) for vi in g.model.graph.input if vi.name in names}
    sizes: dict[str, int] = {}  # dim_param -> its size
    for name, dims in declared.items():
        if name in given and dims is not None:
            sizes.update((d, int(f)) for d, f in zip(dims, given[name]) if isinstance(d, str) and d not in sizes)
    for name, dims in declared.items():
        if name not in given and dims and isinstance(dims[0], str):
            sizes.setdefault(dims[0], default_dim(len(dims), 0))
    for name, dims in declared.items():
        if dims is None:
            if name not in given:
                raise SpaError(f"input '{name}' has no declared shape; pass --input-shape {name}=...")
            dims = given[name]
        if name in given:
            fixed = tuple(int(d) for d in given[name])
            if len(fixed) != len(dims) or any(isinstance(d, int) and d != f for d, f in zip(dims, fixed)):
                raise SpaError(f"--input-shape {name}={','.join(map(str, fixed))} does not match the "
                               f"declared shape {tuple(d if isinstance(d, int) else '?' for d in dims)}")
            check_elements(fixed, f"--input-shape {name}", max_elements)
            shapes[name] = fixed
            continue
        fixed = []
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                fixed.append(d)
            elif isinstance(d, str) and d in sizes:
                fixed.append(sizes[d])
            else:
                fixed.append(default_dim(len(dims), i))
                if isinstance(d, str):
                    sizes[d] = fixed[-1]
                if i > 0:
                    warnings.append(f"input '{name}' dim {i} ('{d}') is dynamic: using {fixed[-1]} "
                                    f"(set it with --input-shape {name}=...)")
        check_elements(fixed, f"input '{name}'", max_elements)
        shapes[name] = tuple(fixed)
    return shapes, warnings


def infer_shapes(g: Graph, fixed: dict | None) -> tuple[dict, dict]:
    """Run onnx shape inference on a light copy (large initializers become typed inputs, so no weight bytes
    are copied) and return name -> dims (ints, or strings/None for dynamic) and name -> elem type.

    With fixed input shapes, dims that inference leaves symbolic (shape arithmetic it cannot propagate, e.g.
    Expand to a Shape-derived target) are resolved by folding the copy's shape subgraphs with those fixed sizes
    and inferring again. Only the analysis sees these sizes; the model itself keeps its dynamic dims."""
    light = _light_copy(g, fixed)
    if fixed is None:  # the input's own check, on the weightless copy (spa.validate checked the tensors)
        if all(onnx.defs.has(n.op_type, n.domain) for n in light.graph.node):
            check_inference(light)
        else:  # a custom op has no schema: inference cannot see past it; the plain checker still runs
            run_checker(light)
    shapes, dtypes = _inferred(light)
    if fixed:
        lg = Graph(light)
        for _ in range(8):  # each round folds the shape arithmetic the previous inference resolved
            if all(isinstance(d, int) for n in lg.model.graph.node for o in n.output if o in shapes
                   for d in shapes[o]):
                break
            lg.shapes = shapes
            if not fold_constants(lg):
                break
            lg.to_model()
            more, more_types = _inferred(lg.model)
            shapes.update({k: v for k, v in more.items() if all(isinstance(d, int) for d in v)})
            dtypes.update(more_types)
    for name in g.initializer_names():
        shape, dtype = g.const_info(name)
        shapes[name] = shape
        dtypes[name] = helper.np_dtype_to_tensor_dtype(dtype)
    return shapes, dtypes


def _light_copy(g: Graph, fixed: dict | None) -> onnx.ModelProto:
    m = g.model
    light = onnx.ModelProto()
    light.ir_version = m.ir_version
    light.opset_import.extend(m.opset_import)
    lg = light.graph
    lg.name = m.graph.name or "main"
    lg.node.extend(m.graph.node)
    lg.output.extend(m.graph.output)
    for vi in m.graph.input:
        if vi.name in g.input_names:
            vi2 = lg.input.add()
            vi2.CopyFrom(vi)
            if fixed and vi.name in fixed:
                vi2.type.tensor_type.shape.Clear()
                for d in fixed[vi.name]:
                    vi2.type.tensor_type.shape.dim.add().dim_value = int(d)
    for name in g.initializer_names():
        if g.in_subgraph(name):  # the copied nodes carry their bodies' initializers
            continue
        shape, dtype = g.const_info(name)
        if int(np.prod(shape)) <= 64:
            lg.initializer.append(onnx.numpy_helper.from_array(np.asarray(g.const(name)), name))
        else:
            lg.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), list(shape)))
    return light


def check_inference(light: onnx.ModelProto) -> None:
    """The checks verification applies to the pruned model (onnx.checker's full check: strict shape inference),
    applied to the input as given (its light copy: no weight bytes, no stale value_info), so that a defect only
    inference sees — a Transpose perm that repeats an axis, a Reshape target that does not fit — is refused as
    bad input (exit 2) instead of surfacing as a failed verification of the pruned model."""
    try:
        onnx.checker.check_model(light, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        # ValueError: the checker's own conversions (an input declared with element type 0)
        raise SpaError(f"the input model is invalid: {one_line(e, 300)}")


def _inferred(model: onnx.ModelProto) -> tuple[dict, dict]:
    shapes, dtypes = _inferred_once(model)
    for _ in range(len(model.graph.node)):  # past com.microsoft quantized kernels, one inference each
        more = quant.contrib_value_infos(model, shapes, dtypes)
        if not more:
            break
        model.graph.value_info.extend(more)
        shapes, dtypes = _inferred_once(model)
    return shapes, dtypes


def _inferred_once(model: onnx.ModelProto) -> tuple[dict, dict]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    shapes, dtypes = {}, {}
    for body in walk_graphs(inferred.graph):  # subgraphs too: names are unique model-wide
        for vi in [*body.input, *body.value_info, *body.output]:
            dims = static_dims(vi)
            if dims is not None:
                shapes[vi.name] = dims
            dtypes[vi.name] = vi.type.tensor_type.elem_type
        for t in body.initializer:
            shapes[t.name] = tuple(t.dims)
            dtypes[t.name] = t.data_type
    return shapes, dtypes
