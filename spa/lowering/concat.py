"""Concat, Split, Slice, Gather, GatherElements: the lowerings of the rules in spa/operators/concat.py."""
from __future__ import annotations

import torch

from ._util import _axis, _ints, _opt
from .core import lower


@lower("Concat")
def concat(node, inputs, attrs):
    xs = [t for t in inputs if t is not None]
    return [torch.cat(xs, _axis(int(attrs["axis"]), xs[0].dim()))]


@lower("Split")
def split(node, inputs, attrs):
    x = inputs[0]
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    length = x.shape[axis]
    parts = attrs.get("split")
    if parts is None and _opt(inputs, 1) is not None:
        parts = _ints(inputs[1])
    if not parts:
        num = int(attrs.get("num_outputs", 0)) or len(node.output)
        chunk = -(-length // num)
        parts = [min(chunk, max(length - chunk * i, 0)) for i in range(num)]
    return list(torch.split(x, list(parts), axis))


@lower("Slice")
def slice_(node, inputs, attrs):
    x = inputs[0]
    if "starts" in attrs:  # opset < 10
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes, steps = attrs.get("axes"), None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if _opt(inputs, 3) is not None else None
        steps = _ints(inputs[4]) if _opt(inputs, 4) is not None else None
    axes = list(axes) if axes else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, a, step in zip(starts, ends, axes, steps):
        a = _axis(a, x.dim())
        n = x.shape[a]
        start = start + n if start < 0 else start
        end = end + n if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), n), min(max(end, 0), n)
            if step == 1:
                x = x.narrow(a, start, max(end - start, 0))
            else:
                x = x[(slice(None),) * a + (slice(start, end, step),)]
        else:
            start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
            x = x.index_select(a, torch.arange(start, end, step, device=x.device))
    return [x]


@lower("Gather")
def gather(node, inputs, attrs):
    x, idx = inputs[0], inputs[1]
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    picked = x.index_select(axis, idx.reshape(-1))
    return [picked.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]


@lower("GatherElements")
def gather_elements(node, inputs, attrs):
    x, idx = inputs[0], inputs[1]
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    idx = idx.to(torch.int64)
    return [torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))]
