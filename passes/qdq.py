"""Integer kernels written in QDQ form: QLinearConv, QLinearMatMul and com.microsoft QGemm (onnxruntime's QOperator
format) with the com.microsoft element-wise and pooling kernels around them (QLinearAdd, QLinearConcat, ...),
and a dynamically quantized layer (DynamicQuantizeLinear -> ConvInteger/MatMulInteger -> Cast -> Mul by
input scale x weight scale, onnxruntime's `quantize_dynamic`), as DequantizeLinear -> float op [-> QuantizeLinear].

Why: OBS scoring and the least-squares refit model layers as a float op on dequantized operands. An integer kernel
keeps its requantization inside the op, so its layers were ranked by magnitude and never refit, and a 50 % cut of a
quantized ResNet came out at chance accuracy where its QDQ form keeps 99 % (BENCHMARKS.md, "Quantized models").
The rewrite keeps every integer, scale and zero point: the weight and an int32 bias stay integers behind a
DequantizeLinear (the bias's scale, input scale x weight scale, becomes a constant), activations are requantized
with their own scales. onnxruntime fuses the static QDQ form into its integer kernels when it loads the model
(a quantized ResNet-20 ran 5x faster so than in QOperator form here), but not the dynamic one (a dynamically
quantized BERT layer ran 1.65x slower): dynamic layers are written back as they came once the refit is done
(`dynamic_kernels_back`). A layer whose form is not covered
(a run-time weight, a bias with a run-time input scale, QGemm with alpha != 1, a dynamic layer whose scales are
not the two-factor product) stays as it is: ranked by magnitude, not refit, with the refit's warning.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from spa.ir import Graph, attr
from spa.operators.registry import canonical_domain

from .unfuse import Chain

MS = "com.microsoft"
CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


# com.microsoft element-wise and pooling kernels on quantized tensors: (float op, slots of the (x, scale, zero
# point) triples read, slots of the output's scale and zero point, attributes kept). QLinearConcat's inputs are
# triples after its output's pair.
WRAPPERS = {
    "QLinearAdd": ("Add", [(0, 1, 2), (3, 4, 5)], (6, 7), ()),
    "QLinearMul": ("Mul", [(0, 1, 2), (3, 4, 5)], (6, 7), ()),
    "QLinearSigmoid": ("Sigmoid", [(0, 1, 2)], (3, 4), ()),
    "QLinearLeakyRelu": ("LeakyRelu", [(0, 1, 2)], (3, 4), ("alpha",)),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", [(0, 1, 2)], (3, 4), ()),
    "QLinearAveragePool": ("AveragePool", [(0, 1, 2)], (3, 4),
                           ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")),
    "QLinearConcat": ("Concat", None, (0, 1), ("axis",)),
    "QLinearSoftmax": ("Softmax", [(0, 1, 2)], (3, 4), ("axis",)),   # its `opset` attribute: see _rewrite
}
KERNELS = {("", "QLinearConv"), ("", "QLinearMatMul"), ("", "ConvInteger"), ("", "MatMulInteger"), (MS, "QGemm"),
           *((MS, op) for op in WRAPPERS)}


def has_integer_kernels(g: Graph) -> bool:
    return any((canonical_domain(n.domain), n.op_type) in KERNELS for n in g.model.graph.node)


def integer_kernels_to_qdq(g: Graph, dynamic: set[str] | None = None) -> dict[str, int]:
    """Rewrite the main graph's covered integer kernels in QDQ form; how many of each op type. `dynamic` receives
    the names of the float ops that replaced dynamically quantized layers (`dynamic_kernels_back` restores
    them)."""
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13 or not has_integer_kernels(g):   # per-axis DequantizeLinear needs opset 13
        return {}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    count: dict[str, int] = {}
    for node in g.model.graph.node:
        try:
            done = _rewrite(g, node)
        except (ValueError, TypeError, IndexError, KeyError):   # malformed attributes or operands: left as it is
            done = None
        if done is None:
            continue
        chain, gone = done
        replaced[id(node)] = chain.nodes
        if gone and dynamic is not None:
            dynamic.add(chain.name)
        dropped.update(id(n) for n in gone)
        count[node.op_type] = count.get(node.op_type, 0) + 1
    if count:
        _splice(g, replaced, dropped)
    return count


def _splice(g: Graph, replaced: dict[int, list[onnx.NodeProto]], dropped: set[int]) -> None:
    """The main graph's nodes with each node in `replaced` (by id) swapped for its list and those in `dropped`
    left out, in the same order."""
    nodes = []
    for node in g.model.graph.node:
        if id(node) not in dropped:
            nodes.extend(replaced.get(id(node), [node]))
    del g.model.graph.node[:]
    g.model.graph.node.extend(nodes)
    g.refresh()


def _rewrite(g: Graph, node: onnx.NodeProto):
    """(Chain, nodes it replaces besides `node`) or None."""
    ms = node.domain == MS
    if node.domain not in ("", "ai.onnx", MS) or not node.output or any(node.output[1:]):
        return None
    if not ms and node.op_type == "QLinearConv":
        return _static(g, node, "Conv", x=(0, 1, 2), w=(3, 4, 5), y=(6, 7), bias=8, w_axis=0,
                       attrs={a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in CONV_ATTRS})
    if not ms and node.op_type == "QLinearMatMul":
        if not g.is_const(_slot(node, 3)):   # activation x activation (attention scores): both dequantized
            return _wrapped(g, node, "MatMul", [(0, 1, 2), (3, 4, 5)], (6, 7), {})
        return _static(g, node, "MatMul", x=(0, 1, 2), w=(3, 4, 5), y=(6, 7), bias=None, w_axis=1, attrs={})
    if ms and node.op_type in WRAPPERS:
        op, triples, out, kept = WRAPPERS[node.op_type]
        if int(attr(node, "channels_last", 0) or 0):
            return None
        if node.op_type == "QLinearSoftmax" and int(attr(node, "opset", 13) or 0) < 13 \
                and int(attr(node, "axis", -1)) != -1:   # Softmax before opset 13 flattened from `axis` on
            return None
        if triples is None:   # QLinearConcat: Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) per input
            triples = [(i, i + 1, i + 2) for i in range(2, len(node.input), 3)]
            if not triples or (len(node.input) - 2) % 3:
                return None
        return _wrapped(g, node, op, triples, out,
                        {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in kept})
    if ms and node.op_type == "QGemm":
        if float(attr(node, "alpha", 1.0)) != 1.0 or attr(node, "transA", 0):
            return None
        trans_b = int(attr(node, "transB", 0))
        return _static(g, node, "Gemm", x=(0, 1, 2), w=(3, 4, 5), y=(7, 8), bias=6, w_axis=0 if trans_b else 1,
                       attrs={"transB": trans_b} if trans_b else {})
    if not ms and node.op_type in ("ConvInteger", "MatMulInteger"):
        return _dynamic(g, node)
    return None


def _slot(node, i) -> str:
    return node.input[i] if i is not None and i < len(node.input) else ""


def _dq(c: Chain, tag: str, ins: list[str], axis: int | None) -> str:
    ins = list(ins)
    while ins and not ins[-1]:
        ins.pop()
    return c.add("DequantizeLinear", ins, tag, **({"axis": axis} if axis is not None else {}))


def _weight_axis(g: Graph, scale: str, zero_point: str, axis: int) -> int | None | bool:
    """The DequantizeLinear axis of a weight's scale/zero point (None: per tensor); False when it is not a 1-D
    per-axis operand of a constant weight."""
    if not all(g.is_const(n) for n in (scale, zero_point) if n):
        return False
    sizes = [int(np.prod(g.const_info(n)[0])) for n in (scale, zero_point) if n]
    if max(sizes, default=1) <= 1:
        return None
    return axis if all(len(g.const_info(n)[0]) == 1 for n in (scale, zero_point) if n) else False


def _static(g: Graph, node, op: str, *, x, w, y, bias, w_axis: int, attrs: dict):
    """QLinearConv / QLinearMatMul / QGemm: y = Q(op(DQ(x), DQ(w), DQ(bias, x_scale * w_scale)))."""
    w_q, w_scale, w_zp = (_slot(node, i) for i in w)
    if not (w_q and g.is_const(w_q) and w_scale):
        return None
    axis = _weight_axis(g, w_scale, w_zp, w_axis)
    if axis is False:
        return None
    dtype = np.asarray(g.const(w_scale)).dtype
    c = Chain(g, node, dtype)
    xf = _dq(c, "x", [_slot(node, i) for i in x], None)
    wf = _dq(c, "w", [w_q, w_scale, w_zp], axis)
    ins = [xf, wf]
    b = _slot(node, bias)
    if b:
        x_scale = _slot(node, x[1])
        if not (g.is_const(b) and g.is_const(x_scale)) or np.asarray(g.const(b)).dtype != np.int32:
            return None
        scale = (np.asarray(g.const(x_scale), np.float64).reshape(()) * np.asarray(g.const(w_scale), np.float64))
        ins.append(_dq(c, "bias", [b, c.g.add_const(scale.astype(dtype), f"{c.name}_bias_scale")],
                       0 if scale.size > 1 else None))
    y_scale, y_zp = (_slot(node, i) for i in y)
    out = c.add(op, ins, "main", None if y_scale else c.out, **attrs)
    if y_scale:
        c.add("QuantizeLinear", [out, y_scale] + ([y_zp] if y_zp else []), "q", c.out)
    return c, []


def _wrapped(g: Graph, node, op: str, triples, out, attrs: dict):
    """An op on quantized tensors: y = Q(op(DQ(x1), DQ(x2), ...)) with each input's own scale and zero point."""
    if any(not _slot(node, t[0]) or not _slot(node, t[1]) for t in triples) or not _slot(node, out[0]):
        return None
    c = Chain(g, node, np.float32)
    ins = [_dq(c, f"x{k}", [_slot(node, i) for i in t], None) for k, t in enumerate(triples)]
    y = c.add(op, ins, "main", **attrs)
    c.add("QuantizeLinear", [y, _slot(node, out[0])] + ([_slot(node, out[1])] if _slot(node, out[1]) else []),
          "q", c.out)
    return c, []


def _only_consumer(g: Graph, name: str, op: str):
    users = g.consumers.get(name, [])
    if len(users) != 1 or users[0][0].op_type != op or name in g.output_names:
        return None
    return users[0][0]


def _dynamic(g: Graph, node):
    """DynamicQuantizeLinear -> ConvInteger/MatMulInteger -> Cast(float) -> Mul(., Mul(x_scale, w_scale)):
    op(DQ(x_q, x_scale, x_zp), DQ(w_q, w_scale, w_zp)) writing the outer Mul's output."""
    x_q, w_q = _slot(node, 0), _slot(node, 1)
    x_zp, w_zp = _slot(node, 2), _slot(node, 3)
    source = g.producer.get(x_q)
    if not (g.is_const(w_q) and source is not None and source.op_type == "DynamicQuantizeLinear"
            and (not x_zp or x_zp == source.output[2])):
        return None
    cast = _only_consumer(g, node.output[0], "Cast")
    mul = _only_consumer(g, cast.output[0], "Mul") if cast is not None else None
    if mul is None or attr(cast, "to") != onnx.TensorProto.FLOAT:
        return None
    scales = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    product = g.producer.get(scales)
    if product is None or product.op_type != "Mul" or len(g.consumers.get(scales, [])) != 1:
        return None
    x_scale = source.output[1]
    if x_scale not in product.input:
        return None
    w_scale = product.input[1] if product.input[0] == x_scale else product.input[0]
    axis = _weight_axis(g, w_scale, w_zp, 0 if node.op_type == "ConvInteger" else 1)
    if axis is False or not g.is_const(w_scale) or np.asarray(g.const(w_scale)).dtype != np.float32:
        return None
    c = Chain(g, node, np.float32)
    c.out = mul.output[0]
    xf = _dq(c, "x", [x_q, x_scale, source.output[2]], None)
    wf = _dq(c, "w", [w_q, w_scale, w_zp], axis)
    attrs = ({a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in CONV_ATTRS}
             if node.op_type == "ConvInteger" else {})
    c.add("Conv" if node.op_type == "ConvInteger" else "MatMul", [xf, wf], "main", c.out, **attrs)
    return c, [cast, mul, product]


def dynamic_kernels_back(g: Graph, names: set[str]) -> int:
    """The dynamic layers `integer_kernels_to_qdq` rewrote (the float ops named in `names`) in their integer form
    again, with the weights the refit wrote: op(DQ(x_q, x_scale, x_zp), DQ(w_q, w_scale, w_zp)) ->
    Mul(Cast(ConvInteger/MatMulInteger(x_q, w_q, x_zp, w_zp)), Mul(x_scale, w_scale)). Returns how many."""
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for node in g.model.graph.node:
        if node.name not in names or node.op_type not in ("Conv", "MatMul") or len(node.input) != 2:
            continue
        dx, dw = (g.producer.get(i) for i in node.input)
        if not all(d is not None and d.op_type == "DequantizeLinear" and len(g.consumers.get(d.output[0], [])) == 1
                   for d in (dx, dw)):
            continue
        x_q, x_scale, x_zp = (list(dx.input) + ["", ""])[:3]
        w_q, w_scale, w_zp = (list(dw.input) + ["", ""])[:3]
        integer = "ConvInteger" if node.op_type == "Conv" else "MatMulInteger"
        out = node.output[0]
        acc, cast, scale = (g.unique(f"{out}_{tag}") for tag in ("integer", "float", "scale"))
        zps = [x_zp, w_zp] if w_zp else ([x_zp] if x_zp else [])
        replaced[id(node)] = [
            helper.make_node(integer, [x_q, w_q, *zps], [acc], name=node.name,
                             **{a.name: helper.get_attribute_value(a) for a in node.attribute}),
            helper.make_node("Cast", [acc], [cast], name=f"{node.name}_cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [x_scale, w_scale], [scale], name=f"{node.name}_scales"),
            helper.make_node("Mul", [cast, scale], [out], name=f"{node.name}_scaled")]
        dropped.update((id(dx), id(dw)))
    if replaced:
        _splice(g, replaced, dropped)
    return len(replaced)
