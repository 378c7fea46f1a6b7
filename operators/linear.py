"""Gemm and MatMul: weight x activation products and activation x activation products (attention).

A constant weight's output axis is a prunable source and its contracted axis a sink. Between two activations
(Q·Kᵀ, A·V) a contraction over a labelled axis couples both sides (the reference model disconnects it with a
mask, there being no weight to zero) and batch axes couple like broadcasting.
"""
from __future__ import annotations

import numpy as np

from spa.ir import attr
from spa.labels import Labels, MaskSink

from ._util import none_labels, prod
from .registry import rule


@rule("Gemm")
def gemm(ctx, node, b_slot: int = 1, c_slot: int = 2):
    """Also QGemm's rule (operators/quantized.py): its B and C sit at other input slots."""
    b = ctx.const(node.input[b_slot])
    x = ctx.inp(node, 0)
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    if b is None or ctx.const(node.input[0]) is not None:
        ctx.freeze_inputs(node, "Gemm without a constant right-hand weight")
        return
    k_axis_x = 0 if trans_a else 1
    if x is not None and x.axis != k_axis_x:
        ctx.freeze(x, node, "channels on the row axis of a Gemm input")
        x = None
    if x is not None:
        ctx.slice_param(node, b_slot, 1 if trans_b else 0, x.atoms, "sink")
    n = b.shape[0 if trans_b else 1]
    out = ctx.new_atoms(node, n, node.input[b_slot])
    ctx.slice_param(node, b_slot, 0 if trans_b else 1, out, "source")
    if len(node.input) > c_slot and node.input[c_slot]:
        c = ctx.const(node.input[c_slot])
        if c is not None and c.ndim >= 1 and c.shape[-1] == n and n > 1:
            ctx.slice_param(node, c_slot, c.ndim - 1, out, "member")
        elif c is None:
            ctx.slice_param(node, c_slot, 0, out, "member")  # freezes: bias computed at run time
    y = ctx.shape(node.output[0])
    k = b.shape[1 if trans_b else 0]
    ctx.cost(node, prod(y) * k if y else 0, [out, x.atoms if x is not None else None])
    ctx.out(node, 0, Labels(1, out))


@rule("MatMul")
def matmul(ctx, node):
    sa, sb, sy = ctx.shape(node.input[0]), ctx.shape(node.input[1]), ctx.shape(node.output[0])
    la, lb = ctx.inp(node, 0), ctx.inp(node, 1)
    ca, cb = ctx.const(node.input[0]), ctx.const(node.input[1])
    if sa is None or sb is None or sy is None or len(sa) < 2 or len(sb) < 2:
        ctx.freeze_inputs(node, "MatMul with unknown or 1-D operand shapes")
        return
    ra, rb, ry = len(sa), len(sb), len(sy)
    k = sa[-1]
    macs = prod(sy) * k
    if cb is not None and ca is None and cb.ndim == 2:
        _weight_right(ctx, node, la, ra, ry, macs)
    elif ca is not None and cb is None and ca.ndim == 2:
        _weight_left(ctx, node, lb, rb, ry, macs)
    elif ca is None and cb is None:
        _activations(ctx, node, la, lb, ra, rb, ry, sa, sb, macs)
    else:
        ctx.freeze_inputs(node, "MatMul with a batched constant operand")


def _weight_right(ctx, node, la, ra, ry, macs, slot: int = 1):
    """x(..., K) · W(K, N): K is a sink, N a new source on the last output axis (W at input `slot`)."""
    if la is not None and la.axis != ra - 1:
        ctx.freeze(la, node, "MatMul input labelled on a non-contracted axis (two labelled output axes)")
        la = None
    if la is not None:
        ctx.slice_param(node, slot, 0, la.atoms, "sink")
    w = ctx.const(node.input[slot])
    out = ctx.new_atoms(node, w.shape[1], node.input[slot])
    ctx.slice_param(node, slot, 1, out, "source")
    ctx.cost(node, macs, [out, la.atoms if la is not None else None])
    ctx.out(node, 0, Labels(ry - 1, out))


def _weight_left(ctx, node, lb, rb, ry, macs):
    """W(M, K) · x(..., K, N): K is a sink, M a new source on the second-to-last output axis."""
    if lb is not None and lb.axis != rb - 2:
        ctx.freeze(lb, node, "MatMul input labelled on a non-contracted axis (two labelled output axes)")
        lb = None
    if lb is not None:
        ctx.slice_param(node, 0, 1, lb.atoms, "sink")
    w = ctx.const(node.input[0])
    out = ctx.new_atoms(node, w.shape[0], node.input[0])
    ctx.slice_param(node, 0, 0, out, "source")
    ctx.cost(node, macs, [out, lb.atoms if lb is not None else None])
    ctx.out(node, 0, Labels(ry - 2, out))


def _activations(ctx, node, la, lb, ra, rb, ry, sa, sb, macs):
    contracted = None
    out_axes: dict[int, list[np.ndarray]] = {}
    # contraction axis: A's last, B's second-to-last
    ka = la.atoms if la is not None and la.axis == ra - 1 else None
    kb = lb.atoms if lb is not None and lb.axis == rb - 2 else None
    if ka is not None or kb is not None:
        a = ka if ka is not None else none_labels(sa[-1])
        b = kb if kb is not None else none_labels(sb[-2])
        contracted = ctx.unify(a, b, node, "contraction of a channel axis with an unlabelled operand")
        ctx.mask_sinks.append(MaskSink(node, 0, ra - 1, contracted))
    la, lb = _shared_batch_axes(ctx, node, la, lb, sa, sb, ry, ka is not None, kb is not None)
    for lab, r, own_out in ((la, ra, ry - 2), (lb, rb, ry - 1)):
        if lab is None or (lab is la and ka is not None) or (lab is lb and kb is not None):
            continue
        if lab.axis == r - 2 and lab is la:
            out_axes.setdefault(own_out, []).append(lab.atoms)
        elif lab.axis == r - 1 and lab is lb:
            out_axes.setdefault(own_out, []).append(lab.atoms)
        elif lab.axis < r - 2:
            out_axes.setdefault(lab.axis + ry - r, []).append(lab.atoms)
        else:
            ctx.freeze(lab, node, "MatMul operand labelled on an unsupported axis")
    if len(out_axes) > 1:
        for arrays in out_axes.values():
            for arr in arrays:
                ctx.freeze(arr, node, "MatMul output would carry two labelled axes")
        out_axes = {}
    out_atoms = None
    for axis, arrays in out_axes.items():
        out_atoms = arrays[0]
        for other in arrays[1:]:
            if len(other) == len(out_atoms):
                out_atoms = ctx.unify(out_atoms, other, node)
            else:  # one side broadcasts (size 1)
                ctx.freeze(other if len(other) == 1 else out_atoms, node, "broadcast of a labelled axis")
                out_atoms = other if len(other) > 1 else out_atoms
        ctx.out(node, 0, Labels(axis, out_atoms))
    ctx.cost(node, macs, [out_atoms, contracted])


def _shared_batch_axes(ctx, node, la, lb, sa, sb, ry, a_contracted, b_contracted):
    """A batch axis (heads of Q·Kᵀ and A·V) pairs position i of A with position i of B: both sides must carry
    the same units. Where one side's axis carries no labels (its head axis was frozen upstream: a runtime
    reshape, an unknown op) and does not broadcast (size 1), the other side's atoms are frozen too; otherwise
    the pruned operands would disagree on the number of heads. Returns the labellings still usable."""
    sides = [(la, sa, a_contracted), (lb, sb, b_contracted)]
    for me, other in ((0, 1), (1, 0)):
        lab, s, contracted = sides[me]
        if lab is None or contracted or lab.axis >= len(s) - 2:
            continue
        olab, os_, _ = sides[other]
        out_axis = lab.axis + ry - len(s)
        o_axis = out_axis - (ry - len(os_))
        if o_axis < 0 or os_[o_axis] == 1:
            continue  # the other operand broadcasts over this axis: nothing of it to keep in step
        if olab is None or olab.axis != o_axis:
            ctx.freeze(lab, node, "batched MatMul: the other operand's matching axis carries no channel labels "
                       "(frozen upstream)")
            sides[me] = (None, s, contracted)
    return sides[0][0], sides[1][0]
