"""Normalizations. Per-channel ones (BatchNorm, InstanceNorm) slice their parameters with the channel; ones
that mix channels (LayerNorm over the channel axis, GroupNorm, LpNorm over it) change meaning when channels
disappear, so they freeze the channels they normalize over (DESIGN.md: channel-mixing reductions)."""
from __future__ import annotations

from spa.ir import attr
from spa.labels import passthrough

from ._util import norm_axis
from .registry import rule


@rule("BatchNormalization", "InstanceNormalization")
def batchnorm(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    if x.axis != 1:
        ctx.freeze(x, node, "channels on a non-channel axis of a normalization")
        return
    last = 5 if node.op_type == "BatchNormalization" else 3
    for i in range(1, min(last, len(node.input))):
        ctx.slice_param(node, i, 0, x.atoms, "member" if i < 3 else "stat")  # running mean/var: not scored
    passthrough(ctx, node)


@rule("LayerNormalization", "RMSNormalization")
def layernorm(ctx, node):
    """Normalizes over the axes from `axis` on (RMSNormalization too: the root mean square of those axes)."""
    x = ctx.inp(node, 0)
    if x is None:
        return
    rank = len(ctx.shape(node.input[0]) or ())
    axis = norm_axis(int(attr(node, "axis", -1)), rank)
    if rank == 0 or x.axis >= axis:
        ctx.freeze(x, node, f"{node.op_type} normalizes over the channel axis (channel-mixing)")
        return
    passthrough(ctx, node)


@rule("GroupNormalization")
def groupnorm(ctx, node):
    ctx.freeze_inputs(node, "GroupNormalization mixes channels within a group")


@rule("LpNormalization", "MeanVarianceNormalization", "LRN")
def mixing_norm(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    rank = len(ctx.shape(node.input[0]) or ())
    if node.op_type == "LpNormalization":
        axes = [norm_axis(int(attr(node, "axis", -1)), rank)]
    elif node.op_type == "MeanVarianceNormalization":
        axes = [norm_axis(a, rank) for a in attr(node, "axes", [0, 2, 3])]
    else:
        axes = [1]  # LRN sums over neighbouring channels
    if x.axis in axes:
        ctx.freeze(x, node, f"{node.op_type} mixes values across the channel axis")
        return
    passthrough(ctx, node)
