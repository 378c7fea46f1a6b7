"""Conv and ConvTranspose (1-D/2-D/3-D, grouped, depthwise).

Output channels are a prunable source. With group == 1 the input-channel axis is a sink (weight axis 1 for Conv,
axis 0 for ConvTranspose). With group > 1 (depthwise included) every conv group couples its input and output
channels into one unit: whole groups are removed and the `group` attribute is rewritten.
"""
from __future__ import annotations

import numpy as np

from spa.ir import attr, set_attr
from spa.labels import Labels

from ._util import none_labels, prod
from .registry import rule


@rule("Conv", "ConvTranspose")
def conv(ctx, node, w_slot: int = 1, b_slot: int | None = 2):
    """Also the rule of the quantized convolutions (operators/quantized.py): their weight and bias sit at other
    input slots (`w_slot`, `b_slot`; None: no bias input)."""
    w = ctx.const(node.input[w_slot])
    x = ctx.inp(node, 0)
    if w is None:
        ctx.freeze_inputs(node, "weight is computed at run time")
        return
    if x is not None and x.axis != 1:
        ctx.freeze(x, node, "channels on a non-channel axis of a convolution input")
        x = None
    transposed = node.op_type == "ConvTranspose"
    groups = int(attr(node, "group", 1))
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    c_out = w.shape[out_axis] * (groups if transposed else 1)
    c_in = w.shape[in_axis] * (1 if transposed else groups)
    out_atoms = ctx.new_atoms(node, c_out, node.input[w_slot])
    kernel = prod(w.shape[2:])

    if groups == 1:
        if x is not None:
            ctx.slice_param(node, w_slot, in_axis, x.atoms, "sink")
        ctx.slice_param(node, w_slot, out_axis, out_atoms, "source")
        in_factor = x.atoms if x is not None else None
    else:
        in_atoms = x.atoms if x is not None else none_labels(c_in)
        per_in, per_out = c_in // groups, c_out // groups
        gi, go = in_atoms.reshape(groups, per_in), out_atoms.reshape(groups, per_out)
        bad = (gi < 0).any(axis=1)
        if bad.any():
            ctx.freeze(go[bad].ravel(), node, "grouped conv: an input group carries unprunable channels")
            ctx.freeze(gi[bad].ravel(), node, "grouped conv: an input group carries unprunable channels")
        ok = ~bad
        if ok.any():
            members = np.concatenate([gi[ok], go[ok]], axis=1)
            ctx.uf.union_arrays(np.repeat(members[:, :1], members.shape[1] - 1, axis=1).ravel(),
                                members[:, 1:].ravel())
        # whole groups go: weight rows (Conv) / input rows (ConvTranspose) follow the group's atoms
        if transposed:
            ctx.slice_param(node, w_slot, 0, in_atoms, "source")
        else:
            ctx.slice_param(node, w_slot, 0, out_atoms, "source")
        in_factor = None

        def set_groups(ap, node=node, out_atoms=out_atoms, groups=groups, per_out=per_out):
            kept = ap.keep(out_atoms).reshape(groups, per_out)
            set_attr(node, "group", int(kept.any(axis=1).sum()))

        ctx.edit(set_groups)
    if b_slot is not None and len(node.input) > b_slot and node.input[b_slot]:
        ctx.slice_param(node, b_slot, 0, out_atoms, "member")

    out_shape = ctx.shape(node.output[0])
    in_shape = ctx.shape(node.input[0])
    if transposed and in_shape is not None:
        macs = prod(in_shape) * (c_out // groups) * kernel
    elif out_shape is not None:
        macs = prod(out_shape) * (c_in // groups) * kernel
    else:
        macs = 0
    ctx.cost(node, macs, [out_atoms, in_factor])
    ctx.out(node, 0, Labels(1, out_atoms))

    if transposed:
        shape_attr = attr(node, "output_shape")
        if shape_attr is not None and out_shape is not None and len(shape_attr) == len(out_shape):
            def set_output_shape(ap, node=node, shape_attr=tuple(shape_attr)):
                new = list(shape_attr)
                new[1] = ap.kept(out_atoms)
                set_attr(node, "output_shape", new)

            ctx.edit(set_output_shape)
