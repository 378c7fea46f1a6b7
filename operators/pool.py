"""Pooling, reductions, softmax, resize and pad: they keep channels apart unless they act on the channel axis,
in which case they mix channels (freeze) or need a shape rewrite (Resize sizes)."""
from __future__ import annotations

from spa.ir import attr
from spa.labels import Labels, passthrough

from ._util import axes_of, norm_axis, shape_element
from .registry import rule
from .shape import is_count, target_element


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
def pool(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    if x.axis != 1:
        ctx.freeze(x, node, "pooling over a channel axis")
        return
    if len(node.output) > 1 and node.output[1] and (ctx.g.consumers.get(node.output[1])
                                                    or node.output[1] in ctx.g.output_names):
        ctx.freeze(x, node, "MaxPool indices encode flat positions that count channels")
        return
    passthrough(ctx, node)


REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@rule(*REDUCE, "ArgMax", "ArgMin")
def reduce(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    rank = len(ctx.shape(node.input[0]) or ())
    if node.op_type.startswith("Arg"):
        axes, known = [int(attr(node, "axis", 0))], True
    else:
        axes, known = axes_of(ctx, node, 1)
    if not known:
        ctx.freeze(x, node, "reduction axes computed at run time")
        return
    if not axes:
        if int(attr(node, "noop_with_empty_axes", 0)):
            passthrough(ctx, node)
            return
        axes = list(range(rank))
    axes = sorted(norm_axis(a, rank) for a in axes)
    if x.axis in axes:
        ctx.freeze(x, node, f"{node.op_type} reduces over the channel axis (channel-mixing)")
        return
    keep = int(attr(node, "keepdims", 1))
    ctx.out(node, 0, Labels(x.axis if keep else x.axis - sum(a < x.axis for a in axes), x.atoms))


@rule("Softmax", "LogSoftmax", "Hardmax", "CumSum", "TopK")
def softmax(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    rank = len(ctx.shape(node.input[0]) or ())
    if node.op_type == "CumSum":
        c = ctx.const(node.input[1])
        axis = None if c is None else int(c.reshape(-1)[0])
    else:
        opset = ctx.options.get("opset", 13)
        axis = int(attr(node, "axis", -1 if opset >= 13 or node.op_type == "TopK" else 1))
    if axis is None:
        ctx.freeze(x, node, "axis computed at run time")
        return
    axis = norm_axis(axis, rank)
    old_style = node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and ctx.options.get("opset", 13) < 13
    if x.axis == axis or (old_style and x.axis >= axis):
        ctx.freeze(x, node, f"{node.op_type} acts across the channel axis (channel-mixing)")
        return
    for o in range(len(node.output)):
        passthrough(ctx, node, 0, o)


@rule("Resize", "Upsample")
def resize(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    rank = len(ctx.shape(node.input[0]) or ())
    axes = attr(node, "axes")
    axes = [norm_axis(a, rank) for a in axes] if axes else list(range(rank))
    if x.axis not in axes:
        passthrough(ctx, node)
        return
    pos = axes.index(x.axis)
    if node.op_type == "Upsample":
        scale_idx, sizes_idx = 1, None
    else:
        scale_idx, sizes_idx = 2, 3
    if sizes_idx is not None and sizes_idx < len(node.input) and node.input[sizes_idx]:
        current, setter = shape_element(ctx, node, sizes_idx, pos)
        if is_count(target_element(ctx, node, sizes_idx, pos)):
            pass  # the current channel count, read at run time: follow_shape_values unifies the labellings
        elif setter is None:
            ctx.freeze(x, node, "Resize sizes computed at run time include the channel axis")
            return
        elif current != len(x.atoms):
            ctx.freeze(x, node, "Resize scales the channel axis")
            return
        else:
            ctx.edit(lambda ap, setter=setter, atoms=x.atoms: setter(ap, ap.kept(atoms)))
    elif scale_idx < len(node.input) and node.input[scale_idx]:
        scales = ctx.const(node.input[scale_idx])
        if scales is None or scales.size <= pos or float(scales.reshape(-1)[pos]) != 1.0:
            ctx.freeze(x, node, "Resize scales the channel axis")
            return
    passthrough(ctx, node)


@rule("Pad")
def pad(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    rank = len(ctx.shape(node.input[0]) or ())
    pads = attr(node, "pads")
    if pads is None and len(node.input) > 1:
        c = ctx.const(node.input[1])
        pads = None if c is None else [int(v) for v in c]
    if pads is None:
        ctx.freeze(x, node, "Pad amounts computed at run time")
        return
    axes, known = axes_of(ctx, node, 3)
    if not known:
        ctx.freeze(x, node, "Pad axes computed at run time")
        return
    axes = [norm_axis(a, rank) for a in axes] if axes else list(range(rank))
    n = len(axes)
    if x.axis in axes:
        i = axes.index(x.axis)
        if pads[i] != 0 or pads[i + n] != 0:
            ctx.freeze(x, node, "Pad adds positions on the channel axis")
            return
    passthrough(ctx, node)
