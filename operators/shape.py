"""Layout operators: Reshape/Flatten (split and merge channel axes), Transpose, Squeeze/Unsqueeze, Expand,
Tile, Shape.

Reshape maps the labelled axis through the smallest block of input and output axes with equal products. Merging
(C,H,W)→C·H·W repeats each channel's atom H·W times; splitting d→(heads, head_dim) makes each outer slice one
removable unit (its atoms are unified), so whole heads go and the kept layout stays a product set. The target
shape's element for the labelled axis is rewritten by Apply.
"""
from __future__ import annotations

import numpy as np

from spa.ir import attr
from spa.labels import Labels, passthrough

from ._util import axes_of, norm_axis, prod, shape_element
from .registry import rule


def map_reshape(ctx, node, lab: Labels, s_in: tuple, s_out: tuple) -> Labels | None:
    """The labelling of a reshaped tensor, or None (atoms frozen) where it cannot be expressed."""
    pre_in = np.cumprod([1, *s_in])
    pre_out = np.cumprod([1, *s_out])
    k = lab.axis
    if s_in[k] == 1:  # a one-channel axis merges with its neighbours; a one-unit group is never pruned anyway
        ctx.freeze(lab, node, "reshape of a single-channel axis")
        return None
    i0 = max(i for i in range(k + 1) if pre_in[i] in pre_out)
    i1 = min((i for i in range(k + 1, len(s_in) + 1) if pre_in[i] in pre_out), default=None)
    if i1 is None:
        ctx.freeze(lab, node, "reshape does not preserve the channel block")
        return None
    j0 = max(j for j in range(len(pre_out)) if pre_out[j] == pre_in[i0])
    j1 = min((j for j in range(j0 + 1, len(pre_out)) if pre_out[j] == pre_in[i1]), default=None)
    if j1 is None:
        ctx.freeze(lab, node, "reshape does not preserve the channel block")
        return None
    block_in = tuple(s_in[i0:i1])
    shape = [1] * len(block_in)
    shape[k - i0] = s_in[k]
    arr = np.broadcast_to(lab.atoms.reshape(shape), block_in).reshape(tuple(s_out[j0:j1]))
    varying = [t for t in range(arr.ndim) if arr.shape[t] > 1 and not (arr == arr.take([0], axis=t)).all()]
    if not varying:
        ctx.freeze(lab, node, "reshape collapses the channel axis")
        return None
    # Split of a channel axis into several: one axis carries the labels and the others are unified, so a unit
    # is a whole slice and the kept set stays a product set. The innermost varying axis (head_dim) is never
    # the carrier; the next one in is: (heads, head_dim) -> heads; (3, heads, head_dim) -> heads, with q/k/v
    # of one head in one unit; (groups, C/groups) -> groups.
    t = varying[-2] if len(varying) > 1 else varying[0]
    rows = np.moveaxis(arr, t, 0).reshape(arr.shape[t], -1)
    if len(varying) > 1:
        has_none = (rows < 0).any(axis=1)
        if has_none.any() and (rows >= 0).any():
            ctx.freeze(rows[has_none].ravel(), node, "reshape splits channels together with unprunable positions")
        for r in rows[~has_none]:
            ctx.uf.union_all(np.unique(r))
    return Labels(j0 + t, rows[:, 0].copy())


@rule("Reshape")
def reshape(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    s_in, s_out = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if s_in is None or s_out is None:
        ctx.freeze(x, node, "reshape with unknown static shapes")
        return
    out = map_reshape(ctx, node, x, s_in, s_out)
    if out is None:
        return
    if out.axis != x.axis and x.axis < len(s_out) and s_out[x.axis] == s_in[x.axis] \
            and shape_element(ctx, node, 1, x.axis)[0] in (0, None):  # a 0 there copies s_in[x.axis]
        ctx.freeze(out, node, "reshape target copies (0) a channel axis into another position")
        return
    current, setter = shape_element(ctx, node, 1, out.axis)
    if current == -1:
        pass  # inferred at run time
    elif current == 0 and out.axis == x.axis and s_in[x.axis] == s_out[out.axis] and not attr(node, "allowzero", 0):
        pass  # copies the (pruned) input dim
    elif setter is None or current in (0, None):
        ctx.freeze(out, node, "reshape target for the channel axis is computed at run time")
        return
    else:
        ctx.edit(lambda ap, setter=setter, atoms=out.atoms: setter(ap, ap.kept(atoms)))
    ctx.out(node, 0, out)


@rule("Flatten")
def flatten(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    s_in = ctx.shape(node.input[0])
    if s_in is None:
        ctx.freeze(x, node, "flatten of unknown static shape")
        return
    axis = norm_axis(int(attr(node, "axis", 1)), len(s_in))
    out = map_reshape(ctx, node, x, s_in, (prod(s_in[:axis]), prod(s_in[axis:])))
    ctx.out(node, 0, out)


@rule("Transpose")
def transpose(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    rank = len(ctx.shape(node.input[0]) or ())
    perm = list(attr(node, "perm", list(reversed(range(rank)))))
    ctx.out(node, 0, x.moved(perm.index(x.axis)))


@rule("Squeeze", "Unsqueeze")
def squeeze(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    axes, known = axes_of(ctx, node, 1)
    s_in, s_out = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if not known or s_in is None or s_out is None:
        ctx.freeze(x, node, f"{node.op_type} axes or shapes unknown")
        return
    if node.op_type == "Squeeze":
        axes = [norm_axis(a, len(s_in)) for a in axes] if axes else [i for i, d in enumerate(s_in) if d == 1]
        if x.axis in axes:
            ctx.freeze(x, node, "squeezes the channel axis")
            return
        ctx.out(node, 0, x.moved(x.axis - sum(a < x.axis for a in axes)))
    else:
        axes = sorted(norm_axis(a, len(s_out)) for a in axes)
        kept = [i for i in range(len(s_out)) if i not in axes]
        ctx.out(node, 0, x.moved(kept[x.axis]))


@rule("Expand")
def expand(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    s_in, s_out = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if s_in is None or s_out is None:
        ctx.freeze(x, node, "Expand with unknown shapes")
        return
    axis = x.axis + len(s_out) - len(s_in)
    shp = ctx.shape(node.input[1])
    pos = axis - (len(s_out) - shp[0]) if shp else -1
    current, setter = shape_element(ctx, node, 1, pos) if pos >= 0 else (1, None)
    if current not in (1, -1):  # 1 broadcasts to the input's (pruned) size
        if setter is None:
            ctx.freeze(x, node, "Expand target for the channel axis is computed at run time")
            return
        ctx.edit(lambda ap, setter=setter, atoms=x.atoms: setter(ap, ap.kept(atoms)))
    ctx.out(node, 0, x.moved(axis))


@rule("Tile")
def tile(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    reps = ctx.const(node.input[1])
    if reps is None or int(reps.reshape(-1)[x.axis]) != 1:
        ctx.freeze(x, node, "Tile repeats the channel axis")
        return
    passthrough(ctx, node)


@rule("Shape")
def shape(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    rank = len(ctx.shape(node.input[0]) or ())
    start = norm_axis(int(attr(node, "start", 0)), rank)
    end = attr(node, "end")
    end = rank if end is None else min(norm_axis(int(end), rank), rank)
    if start <= x.axis < end:
        ctx.freeze(x, node, "Shape reads the size of a channel axis")
