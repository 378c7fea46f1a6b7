"""Verification (DESIGN.md): the pruned model must equal the original with the removed positions disconnected
at their sinks, within a tolerance relative to each output's scale, on random inputs; and pass the full checker.

The reference is the normalized original in which only sink weight slices are zeroed (Conv input channels,
Gemm contracted rows; a MatMul's contracted rows by a 0/1 mask on its input instead, which shares the weight)
and weightless contractions get a 0/1 mask: it never reuses the pruned graph's
index bookkeeping, so it checks concat offsets, reshape blocks, head maps and shape constants independently.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spa import quant
from spa.errors import SpaError, VerificationError, one_line
from spa.groups import Analysis
from spa.ir import (
    MAPPED,
    RAW_VIEW_TYPES,
    Graph,
    has_external_data,
    has_mapped,
    is_mapped,
    needs_external_data,
    release,
    static_dims,
    tensor_value,
    walk_graphs,
    walk_nodes,
    weightless_copy,
)
from spa.memory import array_bytes, check_memory

from .fold import constant_node_value


def build_reference(original: onnx.ModelProto, analysis: Analysis, removed: set[int],
                    node_index: dict[int, int]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(original)
    g = Graph(m)
    nodes = [n for n, _ in walk_nodes(m.graph)]  # bodies' nodes too, in the order node_index counts them
    keep = analysis.keep_mask(removed)
    inserts: dict[int, list] = {}
    for ps in analysis.ctx.params:
        if ps.role != "sink":
            continue
        gone = ~keep(ps.atoms)
        if not gone.any():
            continue
        i = node_index[id(ps.node)]
        node = nodes[i]
        name = node.input[ps.input_index]
        if node.op_type == "MatMul" and ps.input_index == 1 and ps.axis == 0 and node.input[0] \
                and g.is_const(name) and len(g.const_info(name)[0]) == 2:
            # x @ W with rows of W zeroed is x with those columns masked, @ W: the weight is shared, not copied
            # (a 4 GB model's reference would copy every contracted weight)
            mask = g.add_const((~gone).astype(g.const_info(name)[1]), "spa_ref_mask")
            out = g.unique(node.input[0] + "_masked")
            inserts.setdefault(i, []).append(helper.make_node("Mul", [node.input[0], mask], [out]))
            node.input[0] = out
            continue
        w = quant.zeroed(g, node, ps.input_index, ps.axis, gone)   # quantized: set to the zero point
        node.input[ps.input_index] = g.add_const(w, node.input[ps.input_index] + "_ref")
    for ms in analysis.ctx.mask_sinks:
        gone = ~keep(ms.atoms)
        if not gone.any():
            continue
        i = node_index[id(ms.node)]
        node = nodes[i]
        rank = len(analysis.ctx.g.shapes[ms.node.input[ms.input_index]])
        shape = [1] * rank
        shape[ms.axis] = len(gone)
        dtype = helper.tensor_dtype_to_np_dtype(analysis.ctx.g.dtypes.get(ms.node.input[ms.input_index], 1))
        mask = g.add_const((~gone).astype(dtype).reshape(shape), "spa_ref_mask")
        out = g.unique(node.input[ms.input_index] + "_masked")
        inserts.setdefault(i, []).append(helper.make_node("Mul", [node.input[ms.input_index], mask], [out]))
        node.input[ms.input_index] = out
    if inserts:
        before = {id(nodes[i]): muls for i, muls in inserts.items()}
        for graph in reversed(list(walk_graphs(m.graph))):  # bodies first: rebuilding a graph copies its nodes
            if not any(id(n) in before for n in graph.node):
                continue
            new = []
            for n in graph.node:
                new.extend(before.get(id(n), []))
                new.append(n)
            del graph.node[:]
            graph.node.extend(new)
    return g.to_model()


def random_inputs(model: onnx.ModelProto, shapes: dict, seed: int, memory_limit_gb: float | None = None) -> dict:
    """Random feeds of the analysis shapes; integer inputs (token ids) drawn within the tables they index.
    Their size is checked against the memory limit (`memory_limit_gb`, else the CLI's --memory-limit) first."""
    dtypes = {}
    for vi in model.graph.input:
        if vi.name in shapes:
            try:
                dtypes[vi.name] = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
            except (KeyError, TypeError, ValueError):
                raise SpaError(f"model input '{vi.name}' has an unsupported element type "
                               f"{vi.type.tensor_type.elem_type}")
    # inputs are drawn in float64 and cast (3x their size); each draw runs in two sessions (the reference, with its
    # mask nodes, and the pruned model) whose arenas keep what a run allocated, plus the outputs compared: 3x the
    # activations, at most ~6 of the largest live at once in a deep net (measured: 4.6 GB peak for a conv net at
    # batch 100,000, where inputs plus twice the largest activation predicted 0.5 GB; 2.03 GiB at the largest
    # batch a 2x activation term let through; tests/test_hostile_models.py keeps the default run under 2 GB)
    need = 3 * sum(array_bytes(shapes[name], dtype) for name, dtype in dtypes.items())
    total, largest = activation_bytes(model, {k: shapes[k] for k in dtypes})
    need += 3 * min(total, 6 * largest)
    check_memory(need, "verification (inputs and activations) at " + ", ".join(
        f"{name}={'x'.join(map(str, shapes[name]))}" for name in dtypes), memory_limit_gb)
    rng = np.random.default_rng(seed)
    g = Graph(model)
    feeds = {}
    for vi in model.graph.input:
        if vi.name not in shapes:
            continue
        dtype = dtypes[vi.name]
        shape = shapes[vi.name]
        if dtype.kind == "f":
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            value = rng.random(shape) < 0.5
        elif tested := tested_values(g, vi.name):
            value = rng.choice(np.array(tested, dtype=dtype), size=shape)
        else:
            high = _index_range(g, vi.name)
            value = rng.integers(0, high, size=shape).astype(dtype)
        feeds[vi.name] = np.asarray(value)  # a 0-d draw is a numpy scalar, which onnxruntime does not take
    return feeds


def activation_bytes(model: onnx.ModelProto, shapes: dict) -> tuple[int, int]:
    """Bytes of all intermediate tensors and outputs, and of the largest one, when the inputs have `shapes`,
    from onnx shape inference on a weightless copy of the graph (initializers become typed inputs: nothing large
    is copied); (0, 0) when inference cannot tell."""
    try:
        inits = {t.name: t for t in model.graph.initializer}
        inputs = []
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            dims = shapes.get(vi.name)
            elem = vi.type.tensor_type.elem_type
            inputs.append(helper.make_tensor_value_info(vi.name, elem, list(dims) if dims is not None else None))
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits.values()]
        graph = helper.make_graph(model.graph.node, "shapes", inputs, model.graph.output)
        light = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:  # noqa: BLE001 - an estimate: onnxruntime reports what inference cannot
        return 0, 0
    total = largest = 0
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not all(d.HasField("dim_value") for d in tt.shape.dim):
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 8
        size = itemsize * int(np.prod([max(d.dim_value, 0) for d in tt.shape.dim], dtype=object))
        total, largest = total + size, max(largest, size)
    return total, largest


SHARED_SESSION_BYTES = 256 << 20   # draws whose activations sum to less share one session per model (compare)

PASS_VALUES = ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


def tested_values(g: Graph, name: str) -> list:
    """The constants an integer input is compared with for equality (through value-preserving ops): a sample
    rate or a mode switch that the model checks (silero-vad's `sr == 16000` picks an If branch; other values
    make the original itself fail). Random feeds draw from these; [] when the input is not tested so."""
    values, frontier, seen = [], [name], set()
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        for node, idx in g.consumers.get(t, []):
            if node.op_type in PASS_VALUES and idx == 0:
                frontier.extend(node.output)
            elif node.op_type == "Equal" and len(node.input) == 2:
                const = _constant_value(g, node.input[1 - idx])
                if const is not None and const.size <= 16 and const.dtype.kind in "iu":
                    values.extend(int(v) for v in np.ravel(const))
    return sorted(set(values))


def _constant_value(g: Graph, name: str) -> np.ndarray | None:
    """An initializer's value, or a Constant node's (the input model is read before normalization lifts them)."""
    value = g.const(name)
    node = g.producer.get(name)
    if value is None and node is not None and node.op_type == "Constant":
        value = constant_node_value(node)
    return value


def _index_range(g: Graph, name: str) -> int:
    highs = []
    for node, idx in g.consumers.get(name, []):
        if node.op_type == "Gather" and idx == 1:
            table = g.const(node.input[0])
            if table is not None:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                highs.append(table.shape[axis])
    return min(highs) if highs else 2


def run(model: onnx.ModelProto, feeds: dict, what: str = "pruned", extra: tuple = ()) -> list[np.ndarray]:
    return run_many(model, [feeds], what, extra)[0]


def run_many(model: onnx.ModelProto, draws: list[dict], what: str = "pruned",
             extra: tuple = (), small: bool = False) -> list[list[np.ndarray]]:
    """Outputs for each feed dict, from one onnxruntime session (creating one costs a serialization of the
    whole model); `extra`: intermediate tensors returned after the graph outputs. `small`: the draws are a few
    small batches, and the session gets only the basic graph optimizations (ResNet-50: 0.11 s to create against
    0.24 s; the layout transforms of the full set pay off over many samples, not over one or two)."""
    import onnxruntime as ort  # imported here: the no-verify CLI path never pays for it

    ort.set_default_logger_severity(4)  # failures become our one-line error, not ORT's log lines
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if small:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    feeds = draws[0] if draws else {}
    try:
        outputs = model.graph.output
        for name in extra:   # exposed for the session only: the caller's model is left as it was
            outputs.append(helper.make_empty_tensor_value_info(name))
        try:
            sess = open_session(model, opts)
        finally:
            for _ in extra:
                outputs.pop()
        outputs = [sess.run(None, feeds) for feeds in draws]
        weights = sess.borrowed
        del sess
        for w in weights:
            release(w)   # what the session read of mapped weights leaves the resident set
        del weights
        return outputs
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if what == "reference":
            shapes = ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in feeds.items())
            raise SpaError(f"the input model does not run in onnxruntime with inputs {shapes} (dynamic dims: fix "
                           f"them with --input-shape): {msg}")
        raise VerificationError(f"the pruned model does not run in onnxruntime: {msg}")


def open_session(model: onnx.ModelProto, opts):
    """A CPU onnxruntime session of `model` made as `session_source` says; the values it borrows are kept as
    its `borrowed` attribute, so they live as long as it."""
    import onnxruntime as ort

    source, borrowed = session_source(model, opts)
    try:
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    finally:
        if isinstance(source, str):
            os.unlink(source)
    sess.borrowed = borrowed
    return sess


def session_source(model: onnx.ModelProto, opts) -> tuple[bytes | str, list]:
    """What an onnxruntime session is made from, and the values it borrows (they must outlive the session): a
    weightless copy of the model, serialized, whose weights reach onnxruntime without passing through protobuf.
    In memory, each weight of a plain numeric type is handed over as a numpy view (an external initializer):
    ResNet-50's session took 0.22 s from the serialized whole model and 0.065 s so, same outputs (protobuf
    copied and parsed 100 MB twice). Past protobuf's 2 GB a model cannot be serialized whole, and a mapped
    model (weights in files, spa.ir.MappedWeights) should not be: its mapped weights name their files in
    `MAPPED.session_folder()` (a model file written there, which the caller deletes once the session exists):
    onnxruntime maps page-aligned external data read-only, no copy. Pre-packing is off for those: it would hold
    a second copy of every MatMul weight."""
    import onnxruntime as ort

    large_model = needs_external_data(model) or has_mapped(model)
    if large_model:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = False
    skeleton, _ = weightless_copy(model, "spa-weights-in-memory.data")
    if not large_model:   # weights only numpy can view stay in the serialized copy
        for t, h in zip(model.graph.initializer, skeleton.graph.initializer):
            if h.data_location == onnx.TensorProto.EXTERNAL and (
                    t.data_location == onnx.TensorProto.EXTERNAL or t.data_type not in RAW_VIEW_TYPES):
                h.CopyFrom(t)
    g = Graph(skeleton)
    large = {t.name for t in skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for name in large - set(g.consumers) - set(g.output_names):  # unused (a reference's replaced weight): the
        g.remove_initializer(name)                                 # session drops it before taking the values
    large &= set(g.initializer_names())
    linked = {}
    for t in model.graph.initializer:
        if t.name in large and is_mapped(t):
            info = {e.key: e.value for e in t.external_data}
            name = MAPPED.linked_name(info["location"])
            if name is not None:
                linked[t.name] = (name, info["offset"], info["length"])
    for t in skeleton.graph.initializer:
        if t.name in linked:
            del t.external_data[:]
            for key, value in zip(("location", "offset", "length"), linked[t.name]):
                e = t.external_data.add()
                e.key, e.value = key, value
    tensors = [t for t in model.graph.initializer if t.name in large and t.name not in linked]
    arrays = [np.ascontiguousarray(tensor_value(t)) for t in tensors]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if tensors:
        opts.add_external_initializers([t.name for t in tensors], values)
    if not linked:
        return skeleton.SerializeToString(), [*values, *arrays]
    fd, path = tempfile.mkstemp(prefix="session-", suffix=".onnx", dir=MAPPED.session_folder())
    with os.fdopen(fd, "wb") as f:
        f.write(skeleton.SerializeToString())
    return path, [*values, *arrays]


HALF_RTOL = 2e-3   # float16 outputs: removing zero terms (or computing in float32) reorders fp16 sums


def output_rtol(dtype, rtol: float) -> float:
    """The tolerance an output of `dtype` is checked against: `rtol`, at least HALF_RTOL for float16."""
    return max(rtol, HALF_RTOL) if np.dtype(dtype) == np.float16 else rtol


def float_skeleton(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of a model with quantized activations in which each QuantizeLinear of a run-time tensor is a Clip to
    the range its integers hold and each DequantizeLinear of one passes its input through (weights stay
    dequantized constants); None when it has none, or one it cannot so write (a per-axis or run-time activation
    scale, opset < 11). Structural verification compares these: a quantized path requantizes every layer's
    output, and removing channels from a float sum changes its rounding, so a tie goes a step up or down and
    spreads (a QDQ U-Net: 0.8 % at the output with every cut right). The skeleton keeps every cut, every wire and
    the saturation (onnxruntime's quantizer drops a ReLU before a uint8 activation: the clip is that ReLU),
    without the rounding."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    consts = set(values) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    outputs = {o.name for o in graph.output}
    kept = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.output and n.output[0] in outputs}

    def activation_qdq(node) -> bool:   # a quantized graph output keeps its QuantizeLinear (its type), and its DQ
        return node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx") \
            and bool(node.input) and node.input[0] not in consts and node.input[0] not in kept \
            and node.output[0] not in kept

    if not any(activation_qdq(n) for n in graph.node):   # a float model: no copy (this runs in every verification)
        return None
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    g = skeleton.graph
    clips = []
    for node in g.node:
        if not activation_qdq(node):
            continue
        x = node.input[0]
        if node.op_type == "QuantizeLinear":
            bounds = _clip_bounds(node, values)
            if bounds is None or opset < 11:
                return None
            lo = g.initializer.add()
            lo.CopyFrom(numpy_helper.from_array(np.float32(bounds[0]), f"{node.output[0]}__skeleton_min"))
            hi = g.initializer.add()
            hi.CopyFrom(numpy_helper.from_array(np.float32(bounds[1]), f"{node.output[0]}__skeleton_max"))
            clips.append((node, [x, lo.name, hi.name], "Clip"))
        else:
            clips.append((node, [x], "Identity"))
    for node, inputs, op in clips:
        del node.input[:]
        node.input.extend(inputs)
        del node.attribute[:]
        node.op_type = op
    del g.value_info[:]   # the integer types there are floats now
    return skeleton


def _clip_bounds(node, values) -> tuple[float, float] | None:
    """The float range a QuantizeLinear's integers hold: ((min - zero point) * scale, (max - zero point) *
    scale), for one constant scale and zero point (uint8 without one); None otherwise."""
    scale = values.get(node.input[1]) if len(node.input) > 1 else None
    zp = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or (len(node.input) > 2 and node.input[2] and zp is None):
        return None
    try:   # tensor_value: a mapped (external) scale too
        s = np.asarray(tensor_value(scale))
        z = np.asarray(tensor_value(zp)) if zp is not None else np.zeros((), np.uint8)
    except Exception:  # noqa: BLE001 - an unreadable operand: no skeleton, the models are compared as they are
        return None
    if s.size != 1 or z.size != 1 or z.dtype.kind not in "iu" or not np.isfinite(s).all():
        return None
    info = np.iinfo(z.dtype)
    zero, step = float(z.reshape(())), float(s.reshape(()))
    return (info.min - zero) * step, (info.max - zero) * step


def compare(reference: onnx.ModelProto, pruned: onnx.ModelProto, shapes: dict, rtol: float = 1e-4,
            seeds=(0, 1), pinned=()) -> dict:
    """Both models on random inputs, one draw per seed: the first at `shapes`, the others at a doubled batch
    (`other_batch`; `pinned`: the inputs --input-shape fixed), so that a pruned model must still serve other batch
    sizes. When the original itself cannot run at the doubled batch (an exporter baked batch 1 into a Reshape),
    that draw falls back to `shapes` and the result carries a warning instead of refusing the run."""
    worst, tol, used, warnings = {}, {}, [], []
    before = squashed_outputs(reference, pruned)
    extra = tuple(dict.fromkeys(before.values()))
    worst_before: dict[str, float] = {}

    def measure(ref_out, new_out) -> None:
        n_out = len(reference.graph.output)
        for name, a, b in zip(extra, ref_out[n_out:], new_out[n_out:]):
            worst_before[name] = max(worst_before.get(name, 0.0), _relative_error(a, b))
        for o, a, b in zip(reference.graph.output, ref_out[:n_out], new_out[:n_out]):
            a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            if a64.shape != b64.shape:
                raise VerificationError(f"output '{o.name}' changed shape {a64.shape} -> {b64.shape}")
            if np.asarray(a).dtype == np.float16:
                tol[o.name] = output_rtol(np.float16, rtol)
            if not np.array_equal(np.isnan(a64), np.isnan(b64)):
                raise VerificationError(f"output '{o.name}' has NaNs where the reference has none (or vice versa)")
            err = _relative_error(a64, b64)
            if not err <= worst.get(o.name, 0.0):  # also takes a NaN error (inf - inf)
                worst[o.name] = err

    draws = [shapes if seed == seeds[0] else other_batch(reference, shapes, pinned) for seed in seeds]
    sizes = [activation_bytes(reference, draw)[0] for draw in draws]
    remaining = list(zip(seeds, draws))
    if all(sizes) and sum(sizes) <= SHARED_SESSION_BYTES:
        # small draws: one session per model for all of them (a session costs a serialization of the model)
        feeds = [random_inputs(reference, draw, seed) for seed, draw in zip(seeds, draws)]
        try:
            ref_outs = run_many(reference, feeds, "reference", extra, small=True)
        except SpaError:
            ref_outs = None  # the one-draw-at-a-time path below says which draw fails and falls back
        if ref_outs is not None:
            for ref_out, new_out in zip(ref_outs, run_many(pruned, feeds, "pruned", extra, small=True)):
                measure(ref_out, new_out)
            used.extend({k: list(v) for k, v in draw.items()} for draw in draws)
            remaining = []
    for seed, draw in remaining:
        feeds = random_inputs(reference, draw, seed)
        try:
            ref_out = run(reference, feeds, "reference", extra)
        except SpaError as e:
            if draw == shapes:
                raise
            warnings.append(f"verification: the input model does not run at a doubled batch "
                            f"({_shapes_text(draw)}): {one_line(e, 200)}; that check used the given shapes "
                            f"instead (the batch size is fixed inside the graph)")
            draw = shapes
            feeds = random_inputs(reference, draw, seed)
            ref_out = run(reference, feeds, "reference", extra)
        used.append({k: list(v) for k, v in draw.items()})
        measure(ref_out, run(pruned, feeds, "pruned", extra))
    branches = []
    for value in (True, False):  # every If branch is checked, whatever the random inputs make the conditions
        forced_ref = force_branches(reference, value)
        if forced_ref is None:
            break
        feeds = random_inputs(reference, shapes, seeds[0])
        try:
            ref_out = run(forced_ref, feeds, "reference", extra)
        except SpaError as e:
            warnings.append(f"verification: with every If condition {value} the input model does not run "
                            f"({one_line(e, 200)}); those branches were checked only where the inputs reach them")
            continue
        measure(ref_out, run(force_branches(pruned, value), feeds, "pruned", extra))
        branches.append(value)
    bad = {k: v for k, v in worst.items() if not v <= tol.get(k, rtol)}
    # a saturated output (a sigmoid map near 0 on random inputs): its error relative to its own tiny scale
    # measures the float rounding of the logits, not the structure; the tensor before the weight-free squashing
    # ops is compared instead (equal inputs give equal outputs)
    checked_before = {k: before[k] for k in bad if k in before and worst_before[before[k]] <= tol.get(k, rtol)}
    bad = {k: v for k, v in bad.items() if k not in checked_before}
    if bad:
        name, err = max(bad.items(), key=lambda kv: kv[1])
        raise VerificationError(f"pruned model differs from its reference: output '{name}' relative error "
                                f"{err:.3g} > {tol.get(name, rtol):g}")
    result = {"max_rel_error": worst, "rtol": rtol, "inputs": len(seeds), "input_shapes": used}
    if tol:
        result["rtol_half_precision"] = tol   # the float16 outputs' wider tolerance, by output
    if branches:
        result["if_conditions_forced"] = branches
    if checked_before:
        result["checked_before_squashing"] = {k: {"tensor": t, "max_rel_error": worst_before[t]}
                                              for k, t in checked_before.items()}
    if warnings:
        result["warnings"] = warnings
    return result


def force_branches(model: onnx.ModelProto, value: bool) -> onnx.ModelProto | None:
    """A copy of the model in which every If (in bodies too) takes the branch `value` selects, or None when the
    model has no If: random inputs rarely reach both branches (a sample-rate switch is one value, a flag drawn
    twice may come out the same), and a pruned branch must equal its reference too."""
    if not any(n.op_type == "If" for n, _ in walk_nodes(model.graph)):
        return None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    name = g.add_const(np.array(value), f"spa_forced_cond_{str(value).lower()}")
    for n, _ in walk_nodes(m.graph):
        if n.op_type == "If" and n.input:
            n.input[0] = name
    return g.to_model()


SQUASHING = {"Sigmoid", "HardSigmoid", "Tanh", "Softmax", "LogSoftmax", "Exp", "Softplus", "Softsign", "Relu",
             "LeakyRelu", "Clip", "Identity"}   # weight-free, elementwise or per row: equal inputs, equal outputs


def squashed_outputs(reference: onnx.ModelProto, pruned: onnx.ModelProto) -> dict[str, str]:
    """For each graph output made by a chain of `SQUASHING` ops: the tensor before the chain, when both models
    compute it (the pruned model keeps the original's tensor names)."""
    def producers(m):
        return {o: n for n in m.graph.node for o in n.output if o}
    ref_of, new_of = producers(reference), producers(pruned)
    out = {}
    for o in reference.graph.output:
        name, node = o.name, ref_of.get(o.name)
        while node is not None and node.op_type in SQUASHING and node.input and node.input[0]:
            name = node.input[0]
            node = ref_of.get(name)
        if name != o.name and name in ref_of and name in new_of:
            out[o.name] = name
    return out


def _relative_error(a, b) -> float:
    a64 = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0)
    b64 = np.nan_to_num(np.asarray(b, dtype=np.float64), nan=0.0)
    if a64.shape != b64.shape:
        return float("inf")
    return float(np.abs(a64 - b64).max(initial=0.0) / max(np.abs(a64).max(initial=0.0), 1e-12))


def _shapes_text(shapes: dict) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())


def other_batch(model: onnx.ModelProto, shapes: dict, pinned=()) -> dict:
    """The shapes of the second verification draw: every batch dim doubled. A batch dim is a dynamic dim 0 of an
    input; a named one (dim_param) is doubled wherever that name appears, in every input and at any position
    (silero-vad's `state` holds the batch at dim 1), an unnamed one only in its own input; inputs without it stay
    as they are. Inputs in `pinned` (--input-shape) keep every dim, and a name they declare keeps its size in every
    input: one name is one size."""
    declared = {vi.name: static_dims(vi) for vi in model.graph.input if vi.name in shapes}
    named = {dims[0] for dims in declared.values() if dims and isinstance(dims[0], str)}
    named -= {d for name, dims in declared.items() if name in pinned for d in dims or () if isinstance(d, str)}
    out = dict(shapes)
    for name, dims in declared.items():
        if name in pinned or not dims or len(dims) != len(shapes[name]):
            continue
        out[name] = tuple(2 * s if d in named or (i == 0 and d is None) else s
                          for i, (d, s) in enumerate(zip(dims, shapes[name])))
    return out


def check(model: onnx.ModelProto) -> None:
    """onnx.checker's full check (strict shape inference included). A model past protobuf's 2 GB cannot be
    serialized whole, nor one whose weights are in an external-data file checked in memory: those are checked by
    path (`check_by_path`)."""
    try:
        if needs_external_data(model) or has_external_data(model):
            check_by_path(model)
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise VerificationError(f"onnx.checker rejected the pruned model: {str(e).splitlines()[0][:300]}")


def check_by_path(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model(path, full_check=True) on the model file as `spa.ir.save_model` writes it past
    2 GB (weights in an external-data file, small tensors inline), in a temporary folder. The checker reads the
    model file and only requires the data file to be a regular file (it never reads external bytes: inference
    needs the small inline ones), so the data file is left sparse: no weight byte is copied or written."""
    with tempfile.TemporaryDirectory(prefix="spa-check-") as folder:
        path = Path(folder) / "model.onnx"
        skeleton, data_bytes = weightless_copy(model, path.name + ".data")
        path.write_bytes(skeleton.SerializeToString())
        with open(Path(folder) / (path.name + ".data"), "wb") as f:
            f.truncate(data_bytes)
        onnx.checker.check_model(str(path), full_check=True)
