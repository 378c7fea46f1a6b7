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
    tensor in place), or (None, None) if the element is computed at run time. Follows Concat of pieces, the
    pattern exporters emit for shapes with a dynamic batch (Concat(Unsqueeze(Gather(Shape(x))), [h], [d])).
    """
    name = node.input[input_index]
    c = ctx.const(name)
    if c is not None:
        flat = np.array(c).reshape(-1)
        if pos >= flat.size:
            return None, None

        def set_direct(ap, value, node=node, i=input_index, flat=flat, pos=pos, shape=c.shape):
            new = flat.copy()
            new[pos] = value
            ap.set_input_const(node, i, new.reshape(shape))

        return int(flat[pos]), set_direct
    prod_node = ctx.g.producer.get(name)
    casts = []  # integer Casts between the Concat and the reader (tf2onnx: Concat in int32, Cast to int64)
    while prod_node is not None and prod_node.op_type == "Cast" and _int_cast(ctx, prod_node):
        casts.append(prod_node)
        prod_node = ctx.g.producer.get(prod_node.input[0])
    if prod_node is not None and prod_node.op_type == "Concat" and int(attr(prod_node, "axis", 0)) == 0:
        offset = 0
        for j, piece in enumerate(prod_node.input):
            s = ctx.shape(piece)
            if s is None or len(s) != 1:
                return None, None
            if offset <= pos < offset + s[0]:
                piece = ctx.const(piece_name := prod_node.input[j])
                if piece is None:
                    return None, None
                at = pos - offset

                def set_via_concat(ap, value, node=node, i=input_index, concat=prod_node, j=j, at=at,
                                   shape=piece.shape, name=piece_name, casts=tuple(casts)):
                    reader, k = node, i
                    for cast in casts:  # each node on the way is copied where others read it too
                        reader, k = ap.private_copy(cast, reader, k), 0
                    target = ap.private_copy(concat, reader, k)  # shared by other reshapes: edit a copy
                    new = np.array(ap.g.const(name), copy=True).reshape(-1)
                    new[at] = value
                    ap.set_input_const(target, j, new.reshape(shape))

                return int(np.array(piece).reshape(-1)[at]), set_via_concat
            offset += s[0]
    return None, None


def _int_cast(ctx, node) -> bool:
    """A Cast from one integer type to another: shape values pass unchanged."""
    src = ctx.g.dtypes.get(node.input[0])
    to = attr(node, "to")
    ints = {TensorProto.INT32, TensorProto.INT64, TensorProto.INT16, TensorProto.UINT32, TensorProto.UINT64}
    return src in ints and to in ints
