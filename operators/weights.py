"""Weight layers: the nodes whose constant weight creates prunable channels, and which input holds that weight.

One table for the whole package. The propagation rules (conv.py, linear.py) are what makes a weight's output
axis a source of atoms; this module answers the question other code keeps asking ("is this node a prunable
weight layer, and where is its weight?") the same way, without running the analysis. tests/test_operator_tables.py
checks that it agrees with the rules: an analysed weight layer's source weight is `node.input[weight_input(node, g)]`.

    WEIGHT_INPUT[op_type]        the input slot that usually holds the weight (MatMul: 1, x·W)
    BIAS_INPUT[op_type]          the input slot of a layer's own bias, where the op has one
    weight_input(node)           that slot for a default-domain weight-layer op, else None
    weight_input(node, g)        the slot that holds a constant weight in graph g, as the rules see it
                                 (Conv/ConvTranspose: a constant input 1; Gemm: a constant B with a computed A;
                                 MatMul: exactly one constant 2-D operand, input 1 or input 0), else None;
                                 from the graph alone: the MatMul rule also wants static operand shapes.
                                 A QDQ weight (DequantizeLinear of constants, spa.quant) counts as a constant
    is_weight_layer(node, g)     weight_input(node, g) is not None
"""
from __future__ import annotations

import onnx

from spa import quant

WEIGHT_INPUT: dict[str, int] = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
BIAS_INPUT: dict[str, int] = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


def weight_input(node: onnx.NodeProto, g=None) -> int | None:
    """The input slot of a node's prunable weight (see the module docstring), or None. `g` is a spa.ir.Graph;
    without it only the op type is looked at."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_INPUT:
        return None
    slot = WEIGHT_INPUT[node.op_type]
    if g is None:
        return slot
    inputs = list(node.input) + ["", ""]
    a, b = inputs[0], inputs[1]
    is_const = _is_weight_const(g)
    if node.op_type in ("Conv", "ConvTranspose"):
        return slot if is_const(b) else None
    if node.op_type == "Gemm":
        return slot if is_const(b) and not is_const(a) else None
    # MatMul: x·W (weight right) or W·x (weight left); two constants or a batched constant make no weight layer
    if is_const(b) and not is_const(a):
        return 1 if _rank(g, b) == 2 else None
    if is_const(a) and not is_const(b):
        return 0 if _rank(g, a) == 2 else None
    return None


def _is_weight_const(g):
    return lambda name: bool(name) and (g.is_const(name) or quant.dequantize_linear_of(g, name) is not None)


def _rank(g, name: str) -> int:
    """The rank of an initializer or of the integers a QDQ weight dequantizes."""
    if g.is_const(name):
        return len(g.const_info(name)[0])
    qt = quant.dequantize_linear_of(g, name)
    return len(g.const_info(qt.node.input[qt.q])[0])


def is_weight_layer(node: onnx.NodeProto, g) -> bool:
    """A default-domain Conv/ConvTranspose/Gemm/MatMul with a constant weight in graph `g` (spa.ir.Graph)."""
    return weight_input(node, g) is not None
