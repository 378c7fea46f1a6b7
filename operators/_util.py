"""Small helpers shared by operator rules."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from spa.ir import attr


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def none_labels(n: int) -> np.ndarray:
    return np.full(n, -1, dtype=np.int64)


def axes_of(ctx, node, input_index: int, attr_name: str = "axes"):
    """Axes given as an attribute (old opsets) or as a constant input (new opsets). Returns (axes, known)."""
    a = attr(node, attr_name)
    if a is not None:
        return list(a), True
    if input_index < len(node.input) and node.input[input_index]:
        c = ctx.const(node.input[input_index])
        if c is None:
            return None, False
        return [int(v) for v in np.atleast_1d(c)], True
    return None, True


def shape_element(ctx, node, input_index: int, pos: int):
    """Find where element `pos` of a shape-vector input is stored, so Apply can rewrite it.

    Returns (current value, setter) where setter(ap, value) writes a fresh constant (never editing a shared
    tensor in place; every node on the way is copied where others read it too), or (None, None) if the element
    is computed at run time. Follows Concat of pieces, the pattern exporters emit for shapes with a dynamic batch
    (Concat(Unsqueeze(Gather(Shape(x))), [h], [d])), integer Casts (tf2onnx: Concat in int32, Cast to int64) and
    constant Slices of such vectors (dynamo: `shape[:-2]` of a Shape() read whose static dims are constants).
    """
    path: list[tuple] = []  # (node on the way, the input followed) from the reader down to the constant
    unlike: list[int] = []  # values the element must not have for the path to hold (Where's condition false)
    reader, k = node, input_index
    while True:
        name = reader.input[k] if k < len(reader.input) else ""
        c = ctx.const(name) if name else None
        if c is not None:
            flat = np.array(c).reshape(-1)
            if not 0 <= pos < flat.size or int(flat[pos]) in unlike:
                return None, None

            def setter(ap, value, node=node, i=input_index, path=tuple(path), pos=pos, shape=c.shape):
                r, kk = node, i
                for hop, hk in path:
                    r, kk = ap.private_copy(hop, r, kk), hk
                new = np.array(ap.g.const(r.input[kk]), copy=True).reshape(-1)
                new[pos] = value
                ap.set_input_const(r, kk, new.reshape(shape))

            return int(flat[pos]), setter
        prod = ctx.g.producer.get(name) if name else None
        if prod is None:
            return None, None
        if prod.op_type == "Cast" and _int_cast(ctx, prod):
            step = 0
        elif prod.op_type == "Reshape" and len(ctx.shape(prod.input[0]) or ()) == 1 \
                and len(ctx.shape(prod.output[0]) or ()) == 1:
            step = 0  # a vector reshaped to [-1]
        elif prod.op_type == "Where" and (avoid := _where_keeps_else(ctx, prod, pos)) is not None:
            # TorchScript's expand(sizes): Where(Equal(sizes, -1), 1, sizes) keeps a size that is not -1
            unlike.append(avoid)
            step = 2
        elif prod.op_type == "Slice":
            start = _slice_start(ctx, prod)
            if start is None:
                return None, None
            pos, step = pos + start, 0
        elif prod.op_type == "Concat" and int(attr(prod, "axis", 0)) == 0:
            offset, step = 0, None
            for j, piece in enumerate(prod.input):
                s = ctx.shape(piece)
                if s is None or len(s) != 1:
                    return None, None
                if offset <= pos < offset + s[0]:
                    pos, step = pos - offset, j
                    break
                offset += s[0]
            if step is None:
                return None, None
        else:
            return None, None
        path.append((prod, step))
        reader, k = prod, step


def _where_keeps_else(ctx, node, pos: int) -> int | None:
    """For Where(Equal(v, c), a, v): the value c[pos] that element pos of v must differ from for the Where to
    pass it through, or None when the node is not of that form."""
    eq = ctx.g.producer.get(node.input[0])
    if eq is None or eq.op_type != "Equal" or node.input[2] not in eq.input:
        return None
    c = ctx.const(eq.input[1] if eq.input[0] == node.input[2] else eq.input[0])
    if c is None:
        return None
    c = np.array(c).reshape(-1)
    return int(c[pos] if c.size > 1 else c[0]) if c.size > pos or c.size == 1 else None


def _slice_start(ctx, node) -> int | None:
    """Where a step-1 Slice of a 1-D vector with constant bounds starts in its input, or None."""
    n = ctx.shape(node.input[0])
    if n is None or len(n) != 1 or len(node.input) < 3:
        return None
    bounds = [ctx.const(node.input[i]) if len(node.input) > i and node.input[i] else None for i in range(1, 5)]
    starts, ends, axes, steps = bounds
    if starts is None or ends is None or starts.size != 1 or (axes is not None and int(axes.reshape(-1)[0]) not in
                                                               (0, -1)) or (steps is not None and int(steps.reshape(-1)[0]) != 1):
        return None
    start = int(starts.reshape(-1)[0])
    start = max(start + n[0], 0) if start < 0 else min(start, n[0])
    return start


def _int_cast(ctx, node) -> bool:
    """A Cast from one integer type to another: shape values pass unchanged."""
    src = ctx.g.dtypes.get(node.input[0])
    to = attr(node, "to")
    ints = {TensorProto.INT32, TensorProto.INT64, TensorProto.INT16, TensorProto.UINT32, TensorProto.UINT64}
    return src in ints and to in ints
