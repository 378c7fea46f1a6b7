"""Concat, Split, Slice, Gather, GatherElements, GatherND, ScatterND, ScatterElements: the lowerings of the rules in spa/operators/concat.py."""
from __future__ import annotations

import math
import warnings

import torch

from ..errors import SpaError
from ._util import _axis, _ints, _opt
from .core import lower
from .shape import BATCH_FREE


@lower("Concat")
def concat(node, inputs, attrs):
    xs = [t for t in inputs if t is not None]
    axis = _axis(int(attrs["axis"]), xs[0].dim())
    if attrs.get(BATCH_FREE) and axis != 0 and len({t.shape[0] for t in xs if t.dim()} - {1}) == 1:
        batch = max(t.shape[0] for t in xs)  # a batch-1 operand (a class token expanded to the baked batch)
        xs = [t.expand(batch, *t.shape[1:]) if t.dim() and t.shape[0] == 1 else t for t in xs]  # joins the batch
    return [torch.cat(xs, axis)]


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


def _row_index(idx, dims, device):
    """GatherND/ScatterND index rows (last axis: k coordinates into `dims`, negative ones from the end) as row
    numbers of those k dims flattened, C order: idx.shape[:-1]."""
    dims = torch.tensor(tuple(dims), dtype=torch.int64, device=device)
    idx = torch.where(idx < 0, idx + dims, idx)
    strides = torch.ones(len(dims), dtype=torch.int64, device=device)
    for j in range(len(dims) - 2, -1, -1):
        strides[j] = strides[j + 1] * dims[j + 1]
    return (idx * strides).sum(-1)


@lower("GatherND")
def gather_nd(node, inputs, attrs):
    """Each index row of the last axis (k coordinates) picks a slice of data[b..., :k dims]; batch_dims leading
    dims pair data with indices one to one (GPT-2's dynamo export picks the last token's logits this way)."""
    x, idx = inputs[0], inputs[1].to(torch.int64)
    b, k = int(attrs.get("batch_dims", 0)), idx.shape[-1]
    batch = math.prod(x.shape[:b])
    lin = _row_index(idx, x.shape[b:b + k], x.device).reshape(batch, -1)      # [batch, picks]
    table = x.reshape(batch, math.prod(x.shape[b:b + k]), *x.shape[b + k:])  # [batch, rows, rest...]
    picked = table[torch.arange(batch, device=x.device)[:, None], lin]
    return [picked.reshape(*idx.shape[:-1], *x.shape[b + k:])]


REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}   # ONNX reduction -> torch's


def _reduction(node, attrs) -> str | None:
    value = attrs.get("reduction", "none")
    value = value.decode() if isinstance(value, bytes) else value
    if value != "none" and value not in REDUCTIONS:
        raise SpaError(f"TorchGraph: {node.op_type} reduction '{value}' has no torch lowering (node '{node.name}')")
    return REDUCTIONS.get(value)


@lower("ScatterND")
def scatter_nd(node, inputs, attrs):
    """A copy of data with the slices each index row names replaced by (or reduced with) updates (OPT's
    TorchScript export writes its causal mask this way)."""
    x, idx, updates = inputs[0], inputs[1].to(torch.int64), inputs[2]
    k = idx.shape[-1]
    lin = _row_index(idx, x.shape[:k], x.device).reshape(-1)
    table = x.reshape(math.prod(x.shape[:k]), *x.shape[k:]).clone()
    rows = updates.reshape(-1, *x.shape[k:]).to(x.dtype)
    reduce = _reduction(node, attrs)
    if reduce is None:
        table = table.index_copy(0, lin, rows)
    elif reduce == "sum":
        table = table.index_add(0, lin, rows)
    else:
        with warnings.catch_warnings():  # "index_reduce() is in beta": the values are checked against onnxruntime
            warnings.simplefilter("ignore", UserWarning)
            table = table.index_reduce(0, lin, rows, reduce, include_self=True)
    return [table.reshape(x.shape)]


@lower("ScatterElements")
def scatter_elements(node, inputs, attrs):
    x, idx, updates = inputs[0], inputs[1].to(torch.int64), inputs[2].to(inputs[0].dtype)
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    reduce = _reduction(node, attrs)
    if reduce is None:
        return [x.scatter(axis, idx, updates)]
    return [x.scatter_reduce(axis, idx, updates, reduce, include_self=True)]


@lower("GatherElements")
def gather_elements(node, inputs, attrs):
    x, idx = inputs[0], inputs[1]
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    idx = idx.to(torch.int64)
    return [torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))]
