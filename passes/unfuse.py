"""onnxruntime's offline optimizer (`optimized_model_filepath` at ORT_ENABLE_EXTENDED) saves its fusions as
com.microsoft contrib ops: FusedConv, FusedGemm, FusedMatMul, Gelu, BiasGelu, FastGelu, QuickGelu,
SkipLayerNormalization. They have no ONNX shape inference and no rule here, so they froze everything around
them. Normalization writes each back as the standard ops it fuses (the same computation, as onnxruntime defines
it); onnxruntime fuses them again when it loads the pruned model. A node whose form is not covered (a FusedMatMul
with transposed operands, a SkipLayerNormalization whose statistics outputs are read, an activation not listed,
LayerNormalization before opset 17) stays as it is, and what it touches freezes with its reason.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from spa.ir import Graph, attr

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


def unfuse_contrib(g: Graph) -> int:
    """Rewrite the main graph's covered contrib fusions as standard ops; the number rewritten."""
    if not any(n.domain == MS for n in g.model.graph.node):
        return 0
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    kinds = [t.data_type for t in g.model.graph.initializer if t.data_type in FLOATS]
    dtype = FLOATS[max(set(kinds), key=kinds.count)] if kinds else np.float32   # the weights' float type
    nodes, count = [], 0
    for node in g.model.graph.node:
        chain = None
        if node.domain == MS and node.output and node.output[0] and node.input and node.input[0]:
            try:
                chain = _unfused(g, node, opset, dtype)
            except (ValueError, TypeError, IndexError):   # malformed attributes: left as the file has it
                chain = None
        nodes.extend(chain.nodes if chain is not None else [node])
        count += chain is not None
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
    if opset < 17 or len(ins) < 3 or any(o and (g.consumers.get(o) or o in g.output_names) for o in outs[1:3]):
        return None   # no LayerNormalization op, or its mean / inverse std are read
    summed = c.add("Add", ins[:2], "skip", None if len(ins) > 4 and ins[4] else outs[3] or None)
    if len(ins) > 4 and ins[4]:
        summed = c.add("Add", [summed, ins[4]], "bias", outs[3] or None)
    c.add("LayerNormalization", [summed, ins[2]] + ([ins[3]] if len(ins) > 3 and ins[3] else []), "main", c.out,
          axis=-1, epsilon=float(attr(node, "epsilon", 1e-12)))
    return c
