"""onnxruntime saves its fusions as com.microsoft contrib ops: its offline optimizer (`optimized_model_filepath`
at ORT_ENABLE_EXTENDED) FusedConv, FusedGemm, FusedMatMul, Gelu, BiasGelu, FastGelu, QuickGelu,
SkipLayerNormalization; its transformer optimizer (and onnxsim's simplifier) a transformer's self-attention as one
Attention node with packed Q/K/V weights, its embeddings as EmbedLayerNormalization, a decoder's RMSNorm as
SimplifiedLayerNormalization (in the default domain, where onnxruntime registers it) or
SkipSimplifiedLayerNormalization, and rotary embeddings as RotaryEmbedding. They have no ONNX shape inference
and no rule here, so they froze everything around them. Normalization writes each back as the standard ops it
fuses (the same computation, as onnxruntime defines it); onnxruntime's optimizers fuse them again. A node whose
form is not covered (a FusedMatMul with transposed operands, a normalization whose statistics outputs are read,
an activation not listed, an Attention with a past state, a causal flag, rotary embeddings or a mask of unknown
layout, an interleaved or partial rotary) stays as it is, and what it touches freezes with its reason.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from spa.ir import Graph, attr

from .fold import constant_node_value

MS = "com.microsoft"
FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}
KEPT_ATTRS = {"FusedConv": ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"),
              "FusedGemm": ("alpha", "beta", "transA", "transB")}


class Chain:
    """Standard nodes replacing one fused node: each step's output feeds the next; the last writes `out`."""

    def __init__(self, g: Graph, node: onnx.NodeProto, dtype):
        self.g, self.dtype = g, dtype
        self.out = node.output[0]
        self.name = node.name or self.out
        self.nodes: list[onnx.NodeProto] = []

    def const(self, value: float) -> str:
        return self.g.add_const(np.asarray(value, self.dtype), f"{self.name}_c")

    def tensor(self, tag: str) -> str:
        return self.g.unique(f"{self.out}_{tag}")

    def add(self, op: str, inputs: list, tag: str, output: str | None = None, **attrs) -> str:
        """Append a node; its output (a fresh tensor unless given); the node named after the fused one (the
        main node keeps that name, so --exclude patterns and reports still find it)."""
        output = output or self.tensor(tag)
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.name if tag == "main" else
                                           f"{self.name}_{tag}", **attrs))
        return output


# onnxruntime's own operators in the default domain (registered there by onnxruntime, not defined by ONNX:
# onnx.checker calls a model holding one invalid): its transformer optimizer writes RMSNorm so
ORT_DEFAULT_DOMAIN = {"SimplifiedLayerNormalization"}


def _fused(node: onnx.NodeProto) -> bool:
    return node.domain == MS or (node.domain in ("", "ai.onnx") and node.op_type in ORT_DEFAULT_DOMAIN)


def has_fusions(g: Graph) -> bool:
    """Whether the main graph holds a node `unfuse_contrib` may rewrite."""
    return any(_fused(n) for n in g.model.graph.node)


def unfuse_contrib(g: Graph) -> dict[str, int]:
    """Rewrite the main graph's covered contrib fusions as standard ops; how many of each op type."""
    if not has_fusions(g):
        return {}
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    kinds = [t.data_type for t in g.model.graph.initializer if t.data_type in FLOATS]
    dtype = FLOATS[max(set(kinds), key=kinds.count)] if kinds else np.float32   # the weights' float type
    nodes, count = [], {}
    for node in g.model.graph.node:
        chain = None
        if _fused(node) and node.output and node.output[0] and node.input and node.input[0]:
            try:
                chain = _unfused(g, node, opset, dtype)
            except (ValueError, TypeError, IndexError):   # malformed attributes: left as the file has it
                chain = None
        nodes.extend(chain.nodes if chain is not None else [node])
        if chain is not None:
            count[node.op_type] = count.get(node.op_type, 0) + 1
    if count:
        del g.model.graph.node[:]
        g.model.graph.node.extend(nodes)
        g.refresh()
    return count


def _unfused(g: Graph, node: onnx.NodeProto, opset: int, dtype) -> Chain | None:
    op, ins = node.op_type, list(node.input)
    c = Chain(g, node, dtype)
    if op == "SkipLayerNormalization":
        return _skip_layer_norm(g, node, opset, c)
    if op == "Attention":
        return _attention(g, node, opset, c)
    if op == "EmbedLayerNormalization":
        return _embed_layer_norm(g, node, opset, c)
    if op in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
        return _rms_norm(g, node, opset, c)
    if op == "RotaryEmbedding":
        return _rotary(g, node, opset, c)
    if any(node.output[1:]):
        return None
    if op in KEPT_ATTRS:
        act = attr(node, "activation", b"")
        act = act.decode() if isinstance(act, bytes) else act
        params = list(attr(node, "activation_params", []) or []) if op == "FusedConv" else \
            [v for v in (attr(node, "activation_alpha"), attr(node, "activation_beta")) if v is not None]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in KEPT_ATTRS[op]}
        z = ins[3] if op == "FusedConv" and len(ins) > 3 and ins[3] else None
        y = c.add("Conv" if op == "FusedConv" else "Gemm", ins[:3], "main", None if act or z else c.out, **attrs)
        if z:
            y = c.add("Add", [y, z], "add", None if act else c.out)
        return c if not act or _activation(c, act, params, y, opset) else None
    if op == "FusedMatMul":
        if any(attr(node, a, 0) for a in ("transA", "transB", "transBatchA", "transBatchB")):
            return None
        alpha = float(attr(node, "alpha", 1.0))
        y = c.add("MatMul", ins[:2], "main", c.out if alpha == 1.0 else None)
        if alpha != 1.0:
            c.add("Mul", [y, c.const(alpha)], "alpha", c.out)
        return c
    if op in ("Gelu", "BiasGelu", "FastGelu", "QuickGelu"):
        if opset < 9:
            return None
        x = ins[0]
        if op in ("BiasGelu", "FastGelu") and len(ins) > 1 and ins[1]:
            x = c.add("Add", ins[:2], "bias")
        if op == "QuickGelu":   # x sigmoid(alpha x)
            s = c.add("Sigmoid", [c.add("Mul", [x, c.const(float(attr(node, "alpha", 1.702)))], "scaled")], "sigmoid")
            c.add("Mul", [x, s], "main", c.out)
        elif op == "FastGelu":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            cube = c.add("Mul", [c.add("Pow", [x, c.const(3.0)], "cube"), c.const(0.044715)], "cubic")
            arg = c.add("Mul", [c.add("Add", [x, cube], "inner"), c.const(math.sqrt(2.0 / math.pi))], "arg")
            plus = c.add("Add", [c.add("Tanh", [arg], "tanh"), c.const(1.0)], "plus")
            c.add("Mul", [c.add("Mul", [x, plus], "mul"), c.const(0.5)], "main", c.out)
        else:                   # 0.5 x (1 + erf(x / sqrt 2)), the form onnxruntime's GeluFusion matches
            erf = c.add("Erf", [c.add("Div", [x, c.const(math.sqrt(2.0))], "div")], "erf")
            plus = c.add("Add", [erf, c.const(1.0)], "plus")
            c.add("Mul", [c.add("Mul", [x, plus], "mul"), c.const(0.5)], "main", c.out)
        return c
    return None


def _activation(c: Chain, act: str, params: list, x: str, opset: int) -> bool:
    """The fused activation after `x`, writing the chain's output; False where it is not covered."""
    if act in ("Relu", "Tanh", "Sigmoid"):
        c.add(act, [x], "act", c.out)
    elif act == "LeakyRelu":
        c.add(act, [x], "act", c.out, alpha=float(params[0]) if params else 0.01)
    elif act == "HardSigmoid" and len(params) >= 2:
        c.add(act, [x], "act", c.out, alpha=float(params[0]), beta=float(params[1]))
    elif act == "Clip" and len(params) >= 2:
        if opset >= 11:
            c.add(act, [x, c.const(params[0]), c.const(params[1])], "act", c.out)
        else:
            c.add(act, [x], "act", c.out, min=float(params[0]), max=float(params[1]))
    else:
        return False
    return True


def _skip_layer_norm(g: Graph, node: onnx.NodeProto, opset: int, c: Chain) -> Chain | None:
    """LayerNormalization(input + skip [+ bias]) over the last axis; its 4th output is that sum."""
    ins = list(node.input)
    outs = list(node.output) + [""] * (4 - len(node.output))
    if opset < 11 or len(ins) < 3 or any(_read(g, o) for o in outs[1:3]):
        return None   # its mean / inverse std are read
    summed = _skip_sum(c, ins[:2], ins[4] if len(ins) > 4 else "", outs[3])
    _layer_norm(g, c, summed, ins[2], ins[3] if len(ins) > 3 else "", float(attr(node, "epsilon", 1e-12)), opset)
    return c


def _skip_sum(c: Chain, pair: list[str], bias: str, out: str) -> str:
    """input + skip [+ bias], the sum written to `out` (the fused op's sum output) where that is named."""
    summed = c.add("Add", pair, "skip", None if bias else out or None)
    return c.add("Add", [summed, bias], "bias", out or None) if bias else summed


def _layer_norm(g: Graph, c: Chain, x: str, gamma: str, beta: str, eps: float, opset: int) -> None:
    """LayerNormalization over the last axis, writing the chain's output: the op from opset 17, before it the
    ops exporters wrote (ReduceMean, Sub, Mul, ReduceMean, Add ε, Sqrt, Div, Mul γ [, Add β])."""
    if opset >= 17:
        c.add("LayerNormalization", [x, gamma] + ([beta] if beta else []), "main", c.out, axis=-1, epsilon=eps)
        return
    mean = c.add("ReduceMean", [x], "mean", axes=[-1], keepdims=1)
    centered = c.add("Sub", [x, mean], "centered")
    var = c.add("ReduceMean", [c.add("Mul", [centered, centered], "square")], "variance", axes=[-1], keepdims=1)
    normed = c.add("Div", [centered, c.add("Sqrt", [c.add("Add", [var, c.const(eps)], "eps")], "std")], "normed")
    scaled = c.add("Mul", [normed, gamma], "scaled" if beta else "main", None if beta else c.out)
    if beta:
        c.add("Add", [scaled, beta], "main", c.out)


def _attention(g: Graph, node: onnx.NodeProto, opset: int, c: Chain) -> Chain | None:
    """com.microsoft::Attention as onnxruntime computes it: Q, K, V = input @ W (+ bias), split by
    qkv_hidden_sizes (equal thirds without it) into num_heads heads each; softmax(scale Q Kᵀ + mask) V, heads
    concatenated. The mask, where given, is 2-D [batch, total sequence] (0 masks a key position: it adds
    mask_filter_value), or the row lengths an EmbedLayerNormalization counted (keys past them are masked). Q, K
    and V become three MatMul + Add on slices of the packed weights, the heads Reshape + Transpose, as exporters
    write them (the head rules then see each projection)."""
    ins = list(node.input) + [""] * (7 - len(node.input))
    outs = list(node.output)
    w = g.const(ins[1]) if ins[1] else None
    b = g.const(ins[2]) if ins[2] else None
    heads = int(attr(node, "num_heads", 0))
    if (w is None or w.ndim != 2 or w.dtype.kind != "f" or heads <= 0 or any(ins[4:7])
            or (ins[2] and (b is None or b.ndim != 1 or b.dtype != w.dtype))
            or attr(node, "unidirectional", 0) or attr(node, "do_rotary", 0) or any(_read(g, o) for o in outs[1:])):
        return None
    sizes = [int(v) for v in attr(node, "qkv_hidden_sizes", [])] or [w.shape[1] // 3] * 3
    if len(sizes) != 3 or sum(sizes) != w.shape[1] or (b is not None and b.shape[0] != w.shape[1]) \
            or sizes[0] != sizes[1] or any(s <= 0 or s % heads for s in sizes):
        return None
    mask = ins[3]
    lengths = bool(mask) and _row_lengths(g, mask)
    if mask and (opset < 11 if lengths else (_rank(g, mask) != 2 or g.is_const(mask))):
        return None
    c.dtype = w.dtype   # the scale and mask constants: the weights' (and so the scores') float type
    head_q, head_v = sizes[0] // heads, sizes[2] // heads
    scale = float(attr(node, "scale", 0.0)) or 1.0 / math.sqrt(head_q)
    x, starts = ins[0], np.cumsum([0, *sizes])

    def projection(i: int, tag: str, perm: list[int]) -> str:
        cols = slice(int(starts[i]), int(starts[i + 1]))
        y = c.add("MatMul", [x, g.add_const(np.ascontiguousarray(w[:, cols]), f"{c.name}_{tag}_weight")], tag)
        if b is not None:
            y = c.add("Add", [y, g.add_const(np.ascontiguousarray(b[cols]), f"{c.name}_{tag}_bias")], f"{tag}_bias")
        shape = _ints(g, c, f"{tag}_heads", [0, 0, heads, sizes[i] // heads])
        return c.add("Transpose", [c.add("Reshape", [y, shape], f"{tag}_split")], f"{tag}_heads",
                     perm=perm)

    q = projection(0, "query", [0, 2, 1, 3])
    k = projection(1, "key", [0, 2, 3, 1])          # Kᵀ per head
    v = projection(2, "value", [0, 2, 1, 3])
    scores = c.add("Mul", [c.add("MatMul", [q, k], "scores"), c.const(scale)], "scaled")
    if lengths:   # each row's length: key positions at or past it are masked
        length = c.add("Gather", [c.add("Shape", [x], "shape"), g.add_const(np.array(1, np.int64), f"{c.name}_one")],
                       "length", axis=0)
        keys = c.add("Range", [g.add_const(np.array(0, np.int64), f"{c.name}_zero"), length,
                               g.add_const(np.array(1, np.int64), f"{c.name}_step")], "keys")
        ends = c.add("Reshape", [c.add("Cast", [mask], "ends", to=TensorProto.INT64),
                                 _ints(g, c, "column", [-1, 1])], "end_column")
        keep = c.add("Less", [keys, ends], "keep")
    elif mask:    # 0 in the mask: mask_filter_value added to that key's scores
        keep = c.add("Greater", [mask, g.add_const(np.zeros((), _np_type(g, mask)), f"{c.name}_zero")], "keep")
    if mask:
        bias = c.add("Where", [keep, c.const(0.0), c.const(float(attr(node, "mask_filter_value", -10000.0)))],
                     "mask")
        shape = _ints(g, c, "mask_shape", [0, 1, 1, -1])
        scores = c.add("Add", [scores, c.add("Reshape", [bias, shape], "mask_heads")], "masked")
    probs = c.add("Softmax", [scores], "probs", axis=3)
    merged = c.add("Transpose", [c.add("MatMul", [probs, v], "context")], "merge", perm=[0, 2, 1, 3])
    shape = _ints(g, c, "merged", [0, 0, heads * head_v])
    c.add("Reshape", [merged, shape], "main", c.out)
    return c


def _row_lengths(g: Graph, mask: str) -> bool:
    """Whether a 1-D mask_index holds one length per batch row (keys from there on are padding), as onnxruntime's
    transformer optimizer makes it: EmbedLayerNormalization's second output, or a ReduceSum over axis 1 of the
    2-D 0/1 mask (keepdims 0). A 1-D mask_index of other origin may hold start positions too: not covered."""
    node = g.producer.get(mask)
    if node is None:
        return False
    if node.op_type == "EmbedLayerNormalization" and node.domain == MS:
        return len(node.output) > 1 and node.output[1] == mask
    if node.op_type != "ReduceSum" or node.domain not in ("", "ai.onnx") or attr(node, "keepdims", 1):
        return False
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1:
        axes = _const(g, node.input[1])
    return axes is not None and [int(a) for a in np.ravel(axes)] in ([1], [-1]) and _rank(g, node.input[0]) == 2


def _declared(g: Graph, name: str):
    """The graph's declaration of a tensor (an input, output or value_info), or None."""
    graph = g.model.graph
    return next((info for info in (*graph.input, *graph.value_info, *graph.output) if info.name == name), None)


def _const(g: Graph, name: str):
    """A constant's value: an initializer, or a Constant node's output (lifted to initializers only after this
    rewrite); None for run-time tensors."""
    if not name:
        return None
    value = g.const(name)
    node = g.producer.get(name)
    if value is None and node is not None and node.op_type == "Constant":
        value = constant_node_value(node)
    return value


SAME_RANK = {"Cast", "Identity", "Slice", "Neg", "Relu", "Sigmoid", "Tanh", "Softmax", "Sqrt", "Erf"}


def _rank(g: Graph, name: str, depth: int = 32) -> int | None:
    """A tensor's rank before shape inference (which runs after this rewrite): inferred where known, else
    declared, else read from the operators that make it (rank-keeping unary ops, Transpose, Reshape to a
    constant shape, Unsqueeze, Range, Concat); None where none says."""
    rank = g.rank(name)
    info = _declared(g, name)
    if rank is None and info is not None and info.type.tensor_type.HasField("shape"):
        rank = len(info.type.tensor_type.shape.dim)
    node = g.producer.get(name)
    if rank is not None or node is None or not node.input or depth <= 0:
        return rank
    op, first = node.op_type, node.input[0]
    if op in SAME_RANK:
        return _rank(g, first, depth - 1)
    if op == "Transpose" and attr(node, "perm", None):
        return len(attr(node, "perm"))
    if op == "Range":
        return 1
    if op == "Concat":
        return next((r for r in (_rank(g, i, depth - 1) for i in node.input if i) if r is not None), None)
    shape = _const(g, node.input[1]) if len(node.input) > 1 else None
    if op == "Reshape" and shape is not None and shape.ndim == 1:
        return len(shape)
    if op == "Unsqueeze":
        axes = attr(node, "axes", None) if shape is None else shape
        inner = _rank(g, first, depth - 1)
        return None if axes is None or inner is None else inner + int(np.size(axes))
    return None


def _np_type(g: Graph, name: str):
    """The numpy type of a graph tensor as declared (int32, onnxruntime's mask_index type, where undeclared)."""
    info = _declared(g, name)
    elem = info.type.tensor_type.elem_type if info is not None else 0
    return helper.tensor_dtype_to_np_dtype(elem) if elem else np.int32


def _embed_layer_norm(g: Graph, node: onnx.NodeProto, opset: int, c: Chain) -> Chain | None:
    """com.microsoft::EmbedLayerNormalization: LayerNormalization(word[ids] + position[position_ids, or 0..S-1]
    (+ segment[segment_ids])) over the last axis; its 3rd output is that sum, its 2nd (mask_index) the number of
    ones in each row of the mask (zeros without one), as onnxruntime computes them."""
    ins = list(node.input) + [""] * (9 - len(node.input))
    outs = list(node.output) + [""] * (3 - len(node.output))
    ids, segments, word, position, segment, gamma, beta, mask, position_ids = ins[:9]
    tables = [g.const(t) if t else None for t in (word, position, segment)]
    if opset < 11 or tables[0] is None or tables[1] is None or not gamma or not beta \
            or bool(segments) != bool(segment) or (segment and tables[2] is None):
        return None   # run-time tables
    index_read = _read(g, outs[1])
    if index_read and not mask:
        return None   # zeros: not worth an op chain of its own
    total = c.add("Gather", [word, ids], "word", axis=0)
    if position_ids:
        placed = c.add("Gather", [position, position_ids], "position", axis=0)
    else:         # rows 0..S-1 of the table, S read from the ids at run time
        seq = c.add("Slice", [c.add("Shape", [ids], "shape"), _ints(g, c, "one", [1]), _ints(g, c, "two", [2]),
                              _ints(g, c, "axis", [0])], "length")
        placed = c.add("Slice", [position, _ints(g, c, "start", [0]), seq, _ints(g, c, "axis", [0])], "position")
    total = c.add("Add", [total, placed], "positioned", None if segment else outs[2] or None)
    if segment:
        total = c.add("Add", [total, c.add("Gather", [segment, segments], "segment", axis=0)], "segmented",
                      outs[2] or None)
    _layer_norm(g, c, total, gamma, beta, float(attr(node, "epsilon", 1e-12)), opset)
    if index_read:   # ones per row of the mask, int32
        ones = c.add("Equal", [mask, g.add_const(np.ones((), _np_type(g, mask)), f"{c.name}_one")], "ones")
        counted = c.add("Cast", [ones], "counted", to=TensorProto.INT32)
        if opset >= 13:
            c.add("ReduceSum", [counted, _ints(g, c, "rows", [1])], "mask_index", outs[1], keepdims=0)
        else:
            c.add("ReduceSum", [counted], "mask_index", outs[1], axes=[1], keepdims=0)
    return c


def _ints(g: Graph, c: Chain, tag: str, values: list[int]) -> str:
    return g.add_const(np.array(values, np.int64), f"{c.name}_{tag}")


def _read(g: Graph, name: str) -> bool:
    return bool(name) and bool(g.consumers.get(name) or name in g.output_names)


def _rms_norm(g: Graph, node: onnx.NodeProto, opset: int, c: Chain) -> Chain | None:
    """SimplifiedLayerNormalization (x / sqrt(mean(x²) + ε) · scale over the last axis: RMSNorm) and
    SkipSimplifiedLayerNormalization (the same of input + skip [+ bias]; its 4th output is that sum). Forms over
    other axes, or whose statistics outputs are read, stay fused."""
    ins, outs = list(node.input), list(node.output) + [""] * 4
    skip = node.op_type.startswith("Skip")
    stats = outs[1:3] if skip else outs[1:2]
    if int(attr(node, "axis", -1)) != -1 or any(_read(g, o) for o in stats) or len(ins) < (3 if skip else 2):
        return None
    x, scale = ins[0], ins[2 if skip else 1]
    if skip:
        x = _skip_sum(c, ins[:2], ins[3] if len(ins) > 3 else "", outs[3])
    square = c.add("Mul", [x, x], "square")
    mean = c.add("ReduceMean", [square, _ints(g, c, "axes", [-1])], "mean", keepdims=1) if opset >= 18 else \
        c.add("ReduceMean", [square], "mean", keepdims=1, axes=[-1])
    root = c.add("Sqrt", [c.add("Add", [mean, c.const(float(attr(node, "epsilon", 1e-5)))], "eps")], "root")
    c.add("Mul", [c.add("Div", [x, root], "normed"), scale], "main", c.out)
    return c


def _rotary(g: Graph, node: onnx.NodeProto, opset: int, c: Chain) -> Chain | None:
    """com.microsoft::RotaryEmbedding on [batch, heads, sequence, head size] (as the transformer optimizer places
    it, after the heads' Transpose), not interleaved, over the whole head (rotary_embedding_dim 0), positions
    [batch, sequence]: with cos, sin = the caches' rows at the positions and x = [x1, x2] the head's halves,
    [x1 cos - x2 sin, x2 cos + x1 sin]. Other forms (interleaved, partial, 3-D input, an offset) stay fused."""
    ins = list(node.input)
    if (len(ins) < 4 or attr(node, "interleaved", 0) or attr(node, "rotary_embedding_dim", 0)
            or attr(node, "is_packed_batching", 0) or float(attr(node, "scale", 1.0)) != 1.0 or opset < 13
            or _rank(g, ins[1]) != 2 or _rank(g, ins[0]) != 4):
        return None
    caches = [g.const(n) for n in ins[2:4]]
    if any(v is None or v.ndim != 2 for v in caches) or caches[0].shape != caches[1].shape:
        return None
    x, half = ins[0], caches[0].shape[1]
    one = _ints(g, c, "heads_axis", [1])
    cos, sin = (c.add("Unsqueeze", [c.add("Gather", [name, ins[1]], tag, axis=0), one], f"{tag}_heads")
                for name, tag in zip(ins[2:4], ("cos", "sin")))

    def part(tag, start, end):
        bounds = [_ints(g, c, f"{tag}_{k}", [v]) for k, v in (("start", start), ("end", end), ("axis", -1))]
        return c.add("Slice", [x, *bounds], tag)

    x1, x2 = part("first", 0, half), part("second", half, 2 * half)
    rotated = c.add("Sub", [c.add("Mul", [x1, cos], "x1cos"), c.add("Mul", [x2, sin], "x2sin")], "rotated1")
    rotated2 = c.add("Add", [c.add("Mul", [x2, cos], "x2cos"), c.add("Mul", [x1, sin], "x1sin")], "rotated2")
    c.add("Concat", [rotated, rotated2], "main", c.out, axis=-1)
    return c
