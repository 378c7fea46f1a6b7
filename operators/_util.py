"""Small helpers shared by operator rules."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from spa.ir import attr, slice_params


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
    tensor in place), or (None, None) if the element is computed at run time. Follows integer Casts, Concat of
    pieces and constant Gather/Slice picks, nested: the patterns exporters emit for shapes with a dynamic batch
    (Concat(Unsqueeze(Gather(Shape(x))), [h], [d]); tf2onnx's int32 Concat and Cast; Normalize's split of a Shape
    read, Concat(Shape(x, 0, 1), [C, H, W]), then sliced by TorchScript's flatten or nested by dynamo), 1-D
    Reshapes of such vectors, and TorchScript's expand sizes Where(Equal(sizes, -1), 1, sizes).
    """
    found = _element_path(ctx, node.input[input_index], pos) if input_index < len(node.input) else None
    if found is None:
        return None, None
    path, at, value = found

    def set_element(ap, new_value, node=node, i=input_index, path=tuple(path), at=at):
        reader, k = node, i
        for producer, j in path:  # each node on the way is copied where others read it too
            reader, k = ap.private_copy(producer, reader, k), j
        const = np.asarray(ap.g.const(reader.input[k]))
        new = np.array(const, copy=True).reshape(-1)
        new[at] = new_value
        ap.set_input_const(reader, k, new.reshape(const.shape))

    return value, set_element


def _element_path(ctx, name: str, pos: int, depth: int = 0, unlike: tuple = ()):
    """([(producer, input index)] from the reader out to the constant, position in it, value) or None. `unlike`:
    values the element must not have for the path to hold (a Where passes it through only then)."""
    c = ctx.const(name)
    if c is not None:
        flat = np.asarray(c).reshape(-1)
        return ([], pos, int(flat[pos])) if 0 <= pos < flat.size and int(flat[pos]) not in unlike else None
    p = ctx.g.producer.get(name)
    if p is None or depth > 16:
        return None
    if p.op_type == "Cast" and _int_cast(ctx, p):  # tf2onnx: Concat in int32, Cast to int64
        j, q = 0, pos
    elif p.op_type == "Reshape" and len(ctx.shape(p.input[0]) or ()) == 1 and len(ctx.shape(p.output[0]) or ()) == 1:
        j, q = 0, pos  # a vector reshaped to [-1]
    elif p.op_type == "Where" and (avoid := _where_keeps_else(ctx, p, pos)) is not None:
        j, q, unlike = 2, pos, (*unlike, avoid)  # TorchScript's expand(sizes): Where(Equal(sizes, -1), 1, sizes)
    elif p.op_type == "Concat" and int(attr(p, "axis", 0)) in (0, -1):
        j, q = None, pos
        for jj, piece in enumerate(p.input):
            s = ctx.shape(piece)
            if s is None or len(s) != 1:
                return None
            if q < s[0]:
                j = jj
                break
            q -= s[0]
        if j is None:
            return None
    elif p.op_type in ("Gather", "Slice"):
        s = ctx.shape(p.input[0])
        picked = picked_positions(ctx, p, s[0]) if s is not None and len(s) == 1 else None
        if picked is None or not 0 <= pos < len(picked):
            return None
        j, q = 0, int(picked[pos])
    else:
        return None
    inner = _element_path(ctx, p.input[j], q, depth + 1, unlike)
    return None if inner is None else ([(p, j), *inner[0]], inner[1], inner[2])


def picked_positions(ctx, node, n: int) -> np.ndarray | None:
    """The positions of a length-n vector that a Gather/Slice along axis 0 with constant indices or bounds picks."""
    consts = [ctx.const(x) if x else None for x in node.input[1:]]
    if any(c is None for c, x in zip(consts, node.input[1:]) if x):
        return None
    if node.op_type == "Gather":
        if int(attr(node, "axis", 0)) != 0 or not consts:
            return None
        idx = np.asarray(consts[0]).reshape(-1).astype(np.int64)
        if ((idx < -n) | (idx >= n)).any():
            return None
        return np.where(idx < 0, idx + n, idx)
    params = slice_params(node, consts)
    if params is None:
        return None
    starts, ends, axes, steps = params
    if (axes or [0]) not in ([0], [-1]) or len(starts) != 1:
        return None
    return np.arange(n)[slice(starts[0], ends[0], (steps or [1])[0])]


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


def _int_cast(ctx, node) -> bool:
    """A Cast from one integer type to another: shape values pass unchanged."""
    src = ctx.g.dtypes.get(node.input[0])
    to = attr(node, "to")
    ints = {TensorProto.INT32, TensorProto.INT64, TensorProto.INT16, TensorProto.UINT32, TensorProto.UINT64}
    return src in ints and to in ints
