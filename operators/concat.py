"""Concat, Split, Slice, Gather: operators that lay channel positions end to end or pick sub-sequences.

On the channel axis Concat's output labelling is its inputs' laid end to end; Split/Slice/Gather take
sub-sequences and Apply rewrites split sizes, slice bounds and gather indices to the kept positions. On any other
axis they act element-wise on the channel axis (operands unified position by position).
"""
from __future__ import annotations

import numpy as np

from spa.ir import attr, set_attr, slice_params
from spa.labels import Labels

from ._util import none_labels, norm_axis
from .registry import rule


@rule("Concat")
def concat(ctx, node):
    labelled = ctx.labelled_inputs(node)
    if not labelled:
        return
    s_out = ctx.shape(node.output[0])
    shapes = [ctx.shape(x) for x in node.input]
    if s_out is None or any(s is None for s in shapes):
        ctx.freeze_inputs(node, "Concat with unknown shapes")
        return
    axis = norm_axis(int(attr(node, "axis")), len(s_out))
    label_axes = {lab.axis for _, lab in labelled}
    labels = dict(labelled)
    if label_axes == {axis}:
        parts = [labels[i].atoms if i in labels else none_labels(s[axis]) for i, s in enumerate(shapes)]
        ctx.out(node, 0, Labels(axis, np.concatenate(parts)))
        return
    if len(label_axes) != 1:
        ctx.freeze_inputs(node, "Concat inputs labelled on different axes")
        return
    k = label_axes.pop()
    out = None
    for _, lab in labelled:
        out = lab.atoms.copy() if out is None else ctx.unify(out, lab.atoms, node)
    for i, name in enumerate(node.input):
        if i in labels:
            continue
        if ctx.g.is_const(name):
            ctx.slice_param(node, i, k, out, "member")
        else:
            ctx.freeze(out, node, f"concatenated with the unlabelled runtime tensor '{name}'")
    ctx.out(node, 0, Labels(k, out))


@rule("Split")
def split(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    s_in = ctx.shape(node.input[0])
    outs = [ctx.shape(o) for o in node.output]
    if s_in is None or any(s is None for s in outs):
        ctx.freeze(x, node, "Split with unknown shapes")
        return
    axis = norm_axis(int(attr(node, "axis", 0)), len(s_in))
    if axis != x.axis:
        for o in range(len(node.output)):
            ctx.out(node, o, x)
        return
    sizes = [s[axis] for s in outs]
    bounds = np.cumsum([0, *sizes])
    parts = [x.atoms[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    for o, part in enumerate(parts):
        ctx.out(node, o, Labels(axis, part))

    def set_sizes(ap, node=node, parts=parts):
        new = np.array([ap.kept(p) for p in parts], dtype=np.int64)
        if attr(node, "split") is not None:
            set_attr(node, "split", [int(v) for v in new])
            return
        for a in list(node.attribute):
            if a.name == "num_outputs":
                node.attribute.remove(a)
        if len(node.input) < 2:
            node.input.append("")
        ap.set_input_const(node, 1, new)

    ctx.edit(set_sizes)


def sliced_axes(ctx, node, axes, rank: int) -> list[int] | None:
    """The axes a Slice (opset >= 10) cuts when they are known without its bounds: the constant `axes`, or the
    leading axes, as many as `starts` has entries; None otherwise."""
    if axes is not None:
        return [norm_axis(int(a), rank) for a in np.asarray(axes).reshape(-1)]
    if len(node.input) > 3 and node.input[3]:
        return None
    s = ctx.shape(node.input[1])
    return list(range(s[0])) if s is not None and len(s) == 1 else None


@rule("Slice")
def slice_(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    s_in = ctx.shape(node.input[0])
    if s_in is None:
        ctx.freeze(x, node, "Slice of unknown shape")
        return
    rank = len(s_in)
    consts = [ctx.const(n) if i < len(node.input) and (n := node.input[i]) else None for i in range(1, 5)]
    params = slice_params(node, consts)
    if params is None:
        if x.axis not in (sliced_axes(ctx, node, consts[2], rank) or (x.axis,)):
            ctx.out(node, 0, x)  # bounds read at run time on other axes (TorchScript's chunk, rotate_half)
            return
        ctx.freeze(x, node, "Slice bounds computed at run time")
        return
    starts, ends, axes, steps = params
    steps = steps or [1] * len(starts)
    axes = [norm_axis(a, rank) for a in (axes if axes is not None else range(len(starts)))]
    if x.axis not in axes:
        ctx.out(node, 0, x)
        return
    j = axes.index(x.axis)
    n = s_in[x.axis]
    idx = np.arange(n)[slice(starts[j], ends[j], steps[j])]
    if steps[j] != 1:
        ctx.freeze(x, node, "strided Slice on the channel axis")
        return
    out = x.atoms[idx]
    lo = int(idx[0]) if len(idx) else 0

    def set_bounds(ap, node=node, j=j, lo=lo, atoms=x.atoms, hi=lo + len(idx)):
        keep = ap.keep(atoms)
        new_start = int(keep[:lo].sum())
        new_end = new_start + int(keep[lo:hi].sum())
        if len(node.input) == 1:
            st, en = list(attr(node, "starts")), list(attr(node, "ends"))
            st[j], en[j] = new_start, new_end
            set_attr(node, "starts", st)
            set_attr(node, "ends", en)
            return
        for i, v in ((1, new_start), (2, new_end)):
            arr = np.array(ap.g.const(node.input[i]), copy=True)
            arr[j] = v
            ap.set_input_const(node, i, arr)

    ctx.edit(set_bounds)
    ctx.out(node, 0, Labels(x.axis, out))


@rule("Gather")
def gather(ctx, node):
    x, ind_lab = ctx.inp(node, 0), ctx.inp(node, 1)
    if ind_lab is not None:
        ctx.freeze(ind_lab, node, "channel values used as gather indices")
    if x is None:
        return
    s_in = ctx.shape(node.input[0])
    if s_in is None:
        ctx.freeze(x, node, "Gather of unknown shape")
        return
    axis = norm_axis(int(attr(node, "axis", 0)), len(s_in))
    ind = ctx.const(node.input[1])
    if axis != x.axis:
        if ind is None and ctx.shape(node.input[1]) is None:
            ctx.freeze(x, node, "Gather with unknown index shape")
            return
        nd = ind.ndim if ind is not None else len(ctx.shape(node.input[1]))
        ctx.out(node, 0, x.moved(x.axis if x.axis < axis else x.axis + nd - 1))
        return
    if ind is None or ind.ndim > 1:
        ctx.freeze(x, node, "Gather on the channel axis with run-time or multi-dimensional indices")
        return
    pos = np.where(ind < 0, ind + s_in[axis], ind).astype(np.int64)
    if ind.ndim == 0:
        ctx.freeze(x.atoms[pos.reshape(1)], node, "Gather picks a single channel")
        return
    out = x.atoms[pos]

    def remap(ap, node=node, pos=pos, atoms=x.atoms, dtype=ind.dtype):
        keep = ap.keep(atoms)
        new_index = np.cumsum(keep) - 1
        ap.set_input_const(node, 1, new_index[pos[keep[pos]]].astype(dtype))

    ctx.edit(remap)
    ctx.out(node, 0, Labels(axis, out))
