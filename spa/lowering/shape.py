"""Shape and layout operators: the lowerings of the rules in spa/operators/shape.py (and the shape
producers the rules fold or read as constants: Shape, Size, ConstantOfShape, Constant, Range, ...)."""
from __future__ import annotations

import torch

from ._util import _axis, _ints, _opt, _prod
from .core import lower


@lower("Reshape")
def reshape(node, inputs, attrs):
    x = inputs[0]
    shape = _ints(inputs[1]) if len(inputs) > 1 else list(attrs["shape"])
    exported = attrs.get(BATCH_FREE)   # the input's dim 0 at the exported batch of 1
    batch = x.shape[0] // exported if exported and shape and shape[0] > 0 and x.dim() and \
        x.shape[0] > exported and x.shape[0] % exported == 0 else 1
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    if batch > 1:   # a batch of 1 baked into the target (alone in dim 0, or merged with the rows after it):
        shape[0] *= batch   # the input carries `batch` samples, outermost, so dim 0 takes them all
    return [x.reshape(shape)]


BATCH_FREE = "_batch_free"   # TorchGraph(batch_free=True) marks Reshapes (with their input's dim 0 at the exported
#                              batch of 1) and Concats, where a baked batch of 1 would refuse a batch


@lower("Flatten")
def flatten(node, inputs, attrs):
    x = inputs[0]
    axis = _axis(int(attrs.get("axis", 1)), x.dim())
    return [x.reshape(_prod(x.shape[:axis]), _prod(x.shape[axis:]))]


@lower("Transpose")
def transpose(node, inputs, attrs):
    x = inputs[0]
    perm = attrs.get("perm") or list(range(x.dim() - 1, -1, -1))
    return [x.permute(*perm)]


def _axes_arg(inputs, attrs):
    if "axes" in attrs:
        return list(attrs["axes"])
    if _opt(inputs, 1) is not None:
        return _ints(inputs[1])
    return None


@lower("Squeeze")
def squeeze(node, inputs, attrs):
    x = inputs[0]
    axes = _axes_arg(inputs, attrs)
    if not axes:  # absent (or empty, as onnxruntime reads it): every size-1 axis
        return [x.squeeze()] if x.dim() else [x]
    return [x.squeeze(tuple(_axis(a, x.dim()) for a in axes))]


@lower("Unsqueeze")
def unsqueeze(node, inputs, attrs):
    x = inputs[0]
    axes = _axes_arg(inputs, attrs)
    out_rank = x.dim() + len(axes)
    for a in sorted(_axis(a, out_rank) for a in axes):
        x = x.unsqueeze(a)
    return [x]


@lower("Expand")
def expand(node, inputs, attrs):
    x = inputs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1])))
    return [x.expand(shape)]


@lower("Tile")
def tile(node, inputs, attrs):
    return [inputs[0].repeat(_ints(inputs[1]))]


@lower("Shape")
def shape(node, inputs, attrs):
    x = inputs[0]
    r = x.dim()
    start = min(max(_axis(int(attrs.get("start", 0)), r), 0), r)
    end = min(max(_axis(int(attrs.get("end", r)), r), 0), r)
    return [torch.tensor(list(x.shape[start:end]), dtype=torch.int64, device=x.device)]


@lower("Size")
def size(node, inputs, attrs):
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64, device=inputs[0].device)]


@lower("ConstantOfShape")
def constant_of_shape(node, inputs, attrs):
    value = attrs.get("value")
    if value is None:
        value = torch.zeros(1, dtype=torch.float32)
    dims = _ints(inputs[0])
    return [torch.full(dims, value.reshape(-1)[0].item(), dtype=value.dtype, device=inputs[0].device)]


@lower("Constant")
def constant(node, inputs, attrs):
    if "value" in attrs:
        return [attrs["value"]]
    if "value_float" in attrs:
        return [torch.tensor(float(attrs["value_float"]), dtype=torch.float32)]
    if "value_floats" in attrs:
        return [torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)]
    if "value_int" in attrs:
        return [torch.tensor(int(attrs["value_int"]), dtype=torch.int64)]
    if "value_ints" in attrs:
        return [torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)]
    raise NotImplementedError(f"Constant node {node.name!r}: only numeric tensor values have a torch lowering")


@lower("Range")
def range_(node, inputs, attrs):
    start, limit, delta = (t.reshape(-1)[0].item() for t in inputs[:3])
    return [torch.arange(start, limit, delta, dtype=inputs[0].dtype, device=inputs[0].device)]


@lower("DepthToSpace")
def depth_to_space(node, inputs, attrs):
    x = inputs[0]
    b = int(attrs["blocksize"])
    n, c, h, w = x.shape
    if attrs.get("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


@lower("SpaceToDepth")
def space_to_depth(node, inputs, attrs):
    x = inputs[0]
    b = int(attrs["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


@lower("Trilu")
def trilu(node, inputs, attrs):
    k = _ints(inputs[1])[0] if _opt(inputs, 1) is not None else 0
    fn = torch.triu if attrs.get("upper", 1) else torch.tril
    return [fn(inputs[0], k)]


@lower("NonZero")
def nonzero(node, inputs, attrs):
    x = inputs[0]
    if x.dim() == 0:
        x = x.reshape(1)
    return [torch.nonzero(x).t().contiguous()]


@lower("OneHot")
def one_hot(node, inputs, attrs):
    idx, depth, values = inputs[0], int(inputs[1].reshape(-1)[0].item()), inputs[2]
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + depth, idx)
    r = idx.dim() + 1
    axis = _axis(int(attrs.get("axis", -1)), r)
    view = [1] * r
    view[axis] = depth
    hit = idx.unsqueeze(axis) == torch.arange(depth, device=idx.device).reshape(view)
    return [torch.where(hit, values[1], values[0])]
