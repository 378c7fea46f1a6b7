"""Numpy evaluation of the small ops exporters use to compute shapes and to re-layout weights.

Used by normalization to fold constant subgraphs (Shape→Gather→Concat chains, Transpose of a weight,
Constant/ConstantOfShape fills) so that weights become initializers and shape targets become editable constants.
Only ops listed here are folded; anything else stays in the graph as it is.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import helper, numpy_helper

from spa.errors import SpaError, one_line
from spa.ir import attr, slice_params


def _axes(node, inputs, idx=1):
    a = attr(node, "axes")
    if a is not None:
        return list(a)
    if len(inputs) > idx and inputs[idx] is not None:
        return [int(v) for v in np.atleast_1d(inputs[idx])]
    return None


def _int_div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        return (np.trunc(a / b)).astype(a.dtype)
    return (a / b).astype(a.dtype)


def _slice(node, ins):
    x = ins[0]
    starts, ends, axes, steps = slice_params(node, ins[1:])
    sl = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes or range(len(starts)), steps or [1] * len(starts)):
        sl[a] = slice(s, e, st)
    return x[tuple(sl)]


def _cast(node, ins):
    return ins[0].astype(helper.tensor_dtype_to_np_dtype(attr(node, "to")))


def _const_of_shape(node, ins):
    v = attr(node, "value")
    val = numpy_helper.to_array(v) if v is not None else np.zeros(1, dtype=np.float32)
    return np.full(tuple(int(d) for d in ins[0]), val.reshape(-1)[0], dtype=val.dtype)


def _squeeze(node, ins):
    axes = _axes(node, ins)
    return np.squeeze(ins[0], axis=tuple(axes)) if axes else np.squeeze(ins[0])


def _unsqueeze(node, ins):
    out = ins[0]
    for a in sorted(a % (out.ndim + len(_axes(node, ins))) for a in _axes(node, ins)):
        out = np.expand_dims(out, a)
    return out


def _reshape(node, ins):
    shape = [int(d) for d in ins[1]]
    shape = [ins[0].shape[i] if d == 0 and not attr(node, "allowzero", 0) else d for i, d in enumerate(shape)]
    return ins[0].reshape(shape)


def _gather(node, ins):
    return np.take(ins[0], ins[1].astype(np.int64), axis=attr(node, "axis", 0))


def _concat(node, ins):
    return np.concatenate([np.atleast_1d(x) if x.ndim == 0 else x for x in ins], axis=attr(node, "axis"))


def _transpose(node, ins):
    perm = attr(node, "perm")
    return np.transpose(ins[0], perm)


def _range(node, ins):
    return np.arange(ins[0], ins[1], ins[2]).astype(ins[0].dtype)


def _expand(node, ins):
    shape = tuple(int(d) for d in ins[1])
    return ins[0] * np.ones(shape, dtype=ins[0].dtype)


def _typed(fn):
    return lambda node, ins: np.asarray(fn(*ins)).astype(ins[0].dtype)


FOLDERS = {
    "Identity": lambda n, ins: ins[0],
    "Cast": _cast,
    "Gather": _gather,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Slice": _slice,
    "ConstantOfShape": _const_of_shape,
    "Range": _range,
    "Expand": _expand,
    "Add": _typed(np.add),
    "Sub": _typed(np.subtract),
    "Mul": _typed(np.multiply),
    "Div": lambda n, ins: _int_div(ins[0], ins[1]),
    "Neg": _typed(np.negative),
    "Sqrt": _typed(np.sqrt),
    "Reciprocal": _typed(np.reciprocal),
    "Floor": _typed(np.floor),
    "Ceil": _typed(np.ceil),
    "Equal": lambda n, ins: np.equal(ins[0], ins[1]),
    "Where": lambda n, ins: np.where(ins[0], ins[1], ins[2]),
    "Max": lambda n, ins: np.maximum.reduce(ins).astype(ins[0].dtype),
    "Min": lambda n, ins: np.minimum.reduce(ins).astype(ins[0].dtype),
}

MAX_FOLD_ELEMENTS = 1 << 26  # never materialise a huge Expand/ConstantOfShape


def constant_node_value(node) -> np.ndarray | None:
    """The value of a Constant node, whatever attribute carries it; a tensor that cannot be decoded (an undefined
    element type, data of the wrong length) is bad input, said in one line."""
    for a in node.attribute:
        if a.name == "value":
            try:
                return numpy_helper.to_array(a.t)
            except (TypeError, ValueError) as e:
                raise SpaError(f"Constant node '{node.name or node.output[0]}': its value cannot be read "
                               f"({one_line(e, 120)})") from e
        if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
            v = helper.get_attribute_value(a)
            dtype = np.float32 if "float" in a.name else np.int64
            return np.array(v, dtype=dtype)
    return None


def _result_elements(node, ins) -> int:
    """Elements of the result of the ops whose output can be far larger than their inputs, computed from the
    inputs alone (an upper bound); 0 for the others."""
    try:
        if node.op_type == "ConstantOfShape":
            return math.prod(abs(int(d)) for d in np.atleast_1d(ins[0]))
        if node.op_type == "Expand":
            shape = [abs(int(d)) for d in np.atleast_1d(ins[1])]
            rank = max(len(shape), ins[0].ndim)
            a = [1] * (rank - ins[0].ndim) + list(ins[0].shape)
            b = [1] * (rank - len(shape)) + shape
            return math.prod(max(x, y) for x, y in zip(a, b))
        if node.op_type == "Range":
            start, limit, delta = (float(np.asarray(v).reshape(-1)[0]) for v in ins[:3])
            return 0 if delta == 0 else max(0, math.ceil((limit - start) / delta))
    except (TypeError, ValueError, IndexError, OverflowError, AttributeError):
        return MAX_FOLD_ELEMENTS + 1
    return 0


def evaluate(node, inputs: list) -> list | None:
    fn = FOLDERS.get(node.op_type)
    if fn is None or node.domain not in ("", "ai.onnx"):
        return None
    if _result_elements(node, inputs) > MAX_FOLD_ELEMENTS:
        return None  # never allocate it: the node stays in the graph
    try:
        out = np.asarray(fn(node, inputs))
    except Exception:
        return None
    if out.size > MAX_FOLD_ELEMENTS:
        return None
    return [out]
