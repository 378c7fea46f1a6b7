"""Element-wise operators: unary ops pass labels through; broadcasting ops couple their operands.

Broadcasting (Add/Mul/... residuals, SE gates, per-channel constants): operands are aligned from the right;
labelled operands are unified position by position on the output axis; a constant operand with full size on
that axis is sliced with the channels; a size-1 axis broadcasts and takes no atom; a runtime operand with full
size but no labels freezes the channels it meets.
"""
from __future__ import annotations

from spa.ir import attr
from spa.labels import Labels, passthrough

from ._util import prod
from .registry import rule

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Tanh", "Softplus", "Softsign",
    "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Elu",
    "Selu", "Celu", "ThresholdedRelu", "Mish", "Identity", "Cast", "CastLike", "Not", "IsNaN", "IsInf",
    "Shrink", "Swish", "Relu6",
)
BROADCAST = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor",
)


@rule(*UNARY)
def unary(ctx, node):
    passthrough(ctx, node)


@rule("Dropout")
def dropout(ctx, node):
    passthrough(ctx, node, 0, 0)
    passthrough(ctx, node, 0, 1)  # the mask has the data's shape


@rule("Clip")
def clip(ctx, node):
    for i in (1, 2):  # min/max are scalars by the spec; anything else is not ours to guess
        if i < len(node.input) and node.input[i]:
            c = ctx.const(node.input[i])
            if c is None or c.size != 1:
                ctx.freeze_inputs(node, "Clip with non-scalar bounds")
                return
    passthrough(ctx, node)


@rule(*BROADCAST)
def broadcast(ctx, node):
    y = ctx.shape(node.output[0])
    labelled = ctx.labelled_inputs(node)
    if not labelled:
        return
    if y is None:
        ctx.freeze_inputs(node, "unknown output shape")
        return
    ry = len(y)
    shapes = [ctx.shape(x) if x else None for x in node.input]
    axes = {lab.axis + ry - len(shapes[i]) for i, lab in labelled if shapes[i] is not None}
    if len(axes) != 1 or any(shapes[i] is None for i, _ in labelled):
        ctx.freeze_inputs(node, "operands labelled on different axes")
        return
    k = axes.pop()
    n = y[k]
    labels = dict(labelled)
    out = None
    for i, lab in labelled:
        ax = lab.axis
        if shapes[i][ax] != n:  # a one-channel source broadcast over many: keep it
            ctx.freeze(lab, node, "a single channel broadcast over a channel axis")
        else:
            out = lab.atoms.copy() if out is None else ctx.unify(out, lab.atoms, node)
    if out is None:
        return
    for i, name in enumerate(node.input):
        s = shapes[i]
        if not name or i in labels:
            continue
        if s is None:
            ctx.freeze(out, node, f"operand '{name}' has an unknown shape")
            return
        ax = k - (ry - len(s))
        if ax < 0 or s[ax] == 1:
            continue
        if ctx.is_const(name):
            ctx.slice_param(node, i, ax, out, "member")
        else:
            ctx.freeze(out, node, f"channels meet the runtime tensor '{name}', which carries no channel labels")
    for o in range(len(node.output)):
        ctx.out(node, o, Labels(k, out))


@rule("QuantizeLinear", "DequantizeLinear")
def quantize(ctx, node):
    """Per-tensor scales pass channels through; per-axis scales on the channel axis are sliced with it. A scale
    computed at run time passes them through when it is one value (DynamicQuantizeLinear's, whose own rule makes
    its range the pruned model's)."""
    x = ctx.inp(node, 0)
    if x is None:
        return
    scale = ctx.const(node.input[1])
    if scale is None:
        shapes = [ctx.shape(node.input[i]) for i in (1, 2) if i < len(node.input) and node.input[i]]
        if any(s is None or prod(s) > 1 for s in shapes):
            ctx.freeze(x, node, "quantization scale computed at run time")
        else:
            passthrough(ctx, node)
        return
    if scale.size > 1:
        rank = len(ctx.shape(node.input[0]) or ())
        axis = int(attr(node, "axis", 1))
        axis = axis + rank if axis < 0 else axis
        if axis != x.axis or scale.ndim != 1:
            ctx.freeze(x, node, "blocked or per-axis quantization on another axis")
            return
        for i in (1, 2):
            if i < len(node.input) and node.input[i]:
                ctx.slice_param(node, i, 0, x.atoms, "member")
    passthrough(ctx, node)
