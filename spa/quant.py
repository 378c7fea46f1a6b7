"""Quantized weights: integer initializers read, through their scales and zero points, as the float weights they
stand for. The one place that knows where a graph keeps a quantized weight's parts.

Why: deployment pipelines often hold only the quantized file. A quantized weight's output channel is pruned by
cutting the integer tensor AND its per-channel scale and zero point; scoring reads the dequantized values
(`(q - zero_point) * scale`), and the verification reference disconnects a channel by setting the integers to
the zero point (which dequantizes to exactly 0), not to 0.

Two storages:
  QDQ        DequantizeLinear(q, scale, zero_point) of constants feeding a float op (Conv/Gemm/MatMul, a bias):
             per tensor, per axis (`axis`) or blockwise (`block_size`, opset 21). The rules see the
             DequantizeLinear output as a constant (`dequantize_linear_of`); cutting it cuts q and the scale/zero
             point (`spa.labels.Context.slice_param` redirects there).
  QOperator  the integer op takes q, its scale and zero point as inputs (QLinearConv, QLinearMatMul, QGemm) or
             leaves the scale to a Mul after it (ConvInteger, MatMulInteger: the value read is q - zero_point,
             exact up to that per-tensor factor).

    reader(g, node, i)             the Quantized description when input i of node is a quantized weight's integers
    dequantize_linear_of(g, name)  the Quantized of a DequantizeLinear of constants producing `name`, else None
    value(g, qt)                   the float weight (float32, or the scale's float type)
    zero(g, qt)                    integers of q's shape that dequantize to 0 (the zero point, broadcast)
    quantize(g, qt, w)             float values back into q's integers with its scales (a refit written back)
    widened_scale(g, qt, w)        q's scale widened where a refit value would saturate
    operand_cuts(g, qt, axis)      which of its scale/zero point operands cut along which axis when q is cut
                                   along `axis`; a reason string where they cannot (a block split)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import SpaError
from .ir import attr

# QOperator ops: (domain, op type) -> (integer weight slot, its scale slot or None, its zero point slot)
QOPERATOR: dict[tuple[str, str], tuple[int, int | None, int]] = {
    ("", "QLinearConv"): (3, 4, 5),
    ("", "QLinearMatMul"): (3, 4, 5),
    ("com.microsoft", "QGemm"): (3, 4, 5),
    ("", "ConvInteger"): (1, None, 3),
    ("", "MatMulInteger"): (1, None, 3),
}


@dataclass(frozen=True)
class Quantized:
    """A quantized constant as one node reads it: input slots of the integers, scale and zero point, and q's axis
    along which those vary (None: one value for the whole tensor). block_size > 0: blockwise along `axis`."""

    node: onnx.NodeProto
    q: int
    scale: int | None
    zero_point: int | None
    axis: int | None
    block_size: int = 0


def int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    """An integer attribute of a quantized op, or a one-line error: onnx.checker does not check the attributes of
    com.microsoft ops, and a mutated file gave QGemm a list for transB."""
    value = attr(node, name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpaError(f"the input model is invalid: attribute '{name}' of {node.op_type} node '{node.name}' must "
                       f"be an integer, got {type(value).__name__}")
    return value


def _domain(node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _slot(node, i) -> str:
    return node.input[i] if i is not None and i < len(node.input) else ""


def _size(g, name: str) -> int:
    return int(np.prod(g.const_info(name)[0])) if name and g.is_const(name) else 1


def reader(g, node: onnx.NodeProto, i: int) -> Quantized | None:
    """The Quantized description of input i of `node` when it holds a quantized weight's integer constant."""
    if not g.is_const(_slot(node, i)):
        return None
    key = (_domain(node), node.op_type)
    if key == ("", "DequantizeLinear") and i == 0:
        if not g.is_const(_slot(node, 1)) or (_slot(node, 2) and not g.is_const(_slot(node, 2))):
            return None
        rank = len(g.const_info(node.input[0])[0])
        scale_shape = g.const_info(node.input[1])[0]
        block = int_attr(node, "block_size", 0)
        axis = int_attr(node, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        if block <= 0 and int(np.prod(scale_shape)) <= 1:
            return Quantized(node, 0, 1, 2 if _slot(node, 2) else None, None)
        return Quantized(node, 0, 1, 2 if _slot(node, 2) else None, axis, max(block, 0))
    if key not in QOPERATOR or QOPERATOR[key][0] != i:
        return None
    q, scale, zp = QOPERATOR[key]
    rank = len(g.const_info(node.input[q])[0])
    if node.op_type in ("QLinearConv", "ConvInteger"):
        axis = 0
    elif node.op_type == "QGemm":
        axis = 0 if int_attr(node, "transB", 0) else 1
    else:  # QLinearMatMul, MatMulInteger: per column of B
        axis = rank - 1
    per_axis = max(_size(g, _slot(node, scale)), _size(g, _slot(node, zp))) > 1
    return Quantized(node, q, scale, zp if _slot(node, zp) else None, axis if per_axis else None)


def dequantize_linear_of(g, name: str) -> Quantized | None:
    """The quantized constant a DequantizeLinear of constants turns into `name` (QDQ weights and biases)."""
    node = g.producer.get(name) if name else None
    if node is None or node.op_type != "DequantizeLinear" or _domain(node) != "":
        return None
    return reader(g, node, 0)


def _operand(g, qt: Quantized, slot: int | None, q_shape) -> np.ndarray | None:
    """A scale or zero point broadcast to q's shape (blocks repeated), or None where the op has none."""
    name = _slot(qt.node, slot)
    if not name:
        return None
    v = np.asarray(g.const(name))
    if qt.axis is None or v.size <= 1:
        return v.reshape(())
    if qt.block_size:
        return np.repeat(v, qt.block_size, axis=qt.axis).take(np.arange(q_shape[qt.axis]), axis=qt.axis)
    shape = [1] * len(q_shape)
    shape[qt.axis] = -1
    return v.reshape(shape)


def value(g, qt: Quantized) -> np.ndarray:
    """The float weight (q - zero_point) * scale; ConvInteger/MatMulInteger (scale outside the op): q - zp."""
    q = np.asarray(g.const(qt.node.input[qt.q]))
    zp = _operand(g, qt, qt.zero_point, q.shape)
    v = q.astype(np.float64) - (zp.astype(np.float64) if zp is not None else 0.0)
    scale = _operand(g, qt, qt.scale, q.shape)
    if scale is None:
        return v.astype(np.float32)
    return (v * scale.astype(np.float64)).astype(scale.dtype)


def zero(g, qt: Quantized) -> np.ndarray:
    """Integers of q's shape and type that dequantize to exactly 0: its zero point (0 without one)."""
    q = np.asarray(g.const(qt.node.input[qt.q]))
    zp = _operand(g, qt, qt.zero_point, q.shape)
    return np.broadcast_to(zp if zp is not None else np.zeros((), q.dtype), q.shape).astype(q.dtype)


def operand_cuts(g, qt: Quantized, axis: int) -> list[tuple[int, int]] | str:
    """[(input slot, its axis)] of the scale and zero point that cut together with q along `axis`; a reason
    string when they cannot (a cut inside the blocks of blockwise quantization)."""
    if qt.axis is None:
        return []
    slots = [s for s in (qt.scale, qt.zero_point) if s is not None and _slot(qt.node, s)]
    if qt.block_size:
        if axis == qt.axis:
            return (f"blockwise quantization (block_size {qt.block_size}) along this axis: a channel is part of a "
                    f"block that shares one scale")
        return [(s, axis) for s in slots]   # scales keep q's rank: the other axes are per position
    if axis != qt.axis:
        return []
    return [(s, 0) for s in slots if _size(g, _slot(qt.node, s)) > 1]


def float_value(g, node: onnx.NodeProto, i: int) -> np.ndarray | None:
    """Input i of `node` as the float values it stands for: dequantized when it is a quantized weight's integers
    (what scoring reads), the initializer itself otherwise, None for a run-time tensor."""
    qt = reader(g, node, i)
    return value(g, qt) if qt is not None else g.const(_slot(node, i))


def weight(g, name: str) -> np.ndarray | None:
    """The float value of a weight input: an initializer, or a QDQ weight dequantized; None at run time."""
    c = g.const(name)
    if c is not None or not name:
        return c
    qt = dequantize_linear_of(g, name)
    return value(g, qt) if qt is not None else None


def weight_use(g, node: onnx.NodeProto, i: int) -> tuple[onnx.NodeProto, int]:
    """The layer input a parameter slice stands for: a slice of a QDQ weight's integers (DequantizeLinear input
    0) is the slice of the weight its only consumer reads; any other slice stands for itself."""
    if node.op_type == "DequantizeLinear" and i == 0:
        users = g.consumers.get(node.output[0], [])
        if len(users) == 1 and users[0][1] >= 0:
            return users[0]
    return node, i


def quantize(g, qt: Quantized, w: np.ndarray) -> tuple[np.ndarray, float]:
    """Float values as q's integers with q's own scales and zero points (round half to even, saturated), as
    QuantizeLinear computes them: a refit weight written back into a quantized model. Returns the integers and
    the fraction of values that fell outside the range the scales can represent (saturated)."""
    q = np.asarray(g.const(qt.node.input[qt.q]))
    scale = _operand(g, qt, qt.scale, q.shape)
    zp = _operand(g, qt, qt.zero_point, q.shape)
    v = np.rint(np.asarray(w, np.float64) / (scale.astype(np.float64) if scale is not None else 1.0))
    v = v + (zp.astype(np.float64) if zp is not None else 0.0)
    info = np.iinfo(q.dtype)
    clipped = float(np.mean((v < info.min) | (v > info.max))) if v.size else 0.0
    return np.clip(v, info.min, info.max).astype(q.dtype), clipped


def widened_scale(g, qt: Quantized, w: np.ndarray) -> np.ndarray | None:
    """q's scale (as stored) widened where it is needed to represent `w` without saturating, each scale
    element only as far as its own values need (a refit weight that left the range its scales were calibrated
    for: keeping the scales would clip it, the refit would be lost). None where no widening helps or may be
    written: no scale input (ConvInteger, MatMulInteger), blockwise scales, a scale other nodes read too, or a
    zero point at the end of the integer range with values on that side."""
    name = _slot(qt.node, qt.scale)
    if not name or qt.block_size or not g.is_const(name) or len(g.consumers.get(name, [])) != 1:
        return None
    q = np.asarray(g.const(qt.node.input[qt.q]))
    scale = np.asarray(g.const(name))
    zp = _operand(g, qt, qt.zero_point, q.shape)
    zp = np.zeros(()) if zp is None else zp.astype(np.float64)
    info = np.iinfo(q.dtype)
    w = np.asarray(w, np.float64)
    above, below = np.broadcast_to(info.max - zp, w.shape), np.broadcast_to(info.min - zp, w.shape)
    if np.any((w > 0) & (above <= 0)) or np.any((w < 0) & (below >= 0)):
        return None
    need = np.maximum(np.where(w > 0, w / np.where(above > 0, above, 1.0), 0.0),
                      np.where(w < 0, w / np.where(below < 0, below, -1.0), 0.0))
    if qt.axis is None or scale.size <= 1:
        need = need.max(initial=0.0)
    else:
        need = need.max(axis=tuple(a for a in range(w.ndim) if a != qt.axis), initial=0.0)
    need = np.asarray(need * (1 + 1e-6)).reshape(scale.shape)   # margin: the division rounds too
    return np.maximum(scale.astype(np.float64), need).astype(scale.dtype)


def zeroed(g, node: onnx.NodeProto, i: int, axis: int, gone: np.ndarray) -> np.ndarray:
    """A copy of input i of `node` whose positions `gone` along `axis` contribute nothing: 0 for a float
    parameter, the zero point for a quantized weight's integers (the verification reference disconnects channels
    with it; compensation probes what a removed channel carried)."""
    w = np.array(g.const(node.input[i]), copy=True)
    index = [slice(None)] * w.ndim
    index[axis] = gone
    qt = reader(g, node, i)
    w[tuple(index)] = zero(g, qt)[tuple(index)] if qt is not None else 0
    return w


# ---- shapes of the com.microsoft kernels onnxruntime's quantizer emits (onnx's inference has no schema for them) ----
def _ms_shape(node: onnx.NodeProto, shapes: dict) -> tuple | None:
    def s(i):
        v = shapes.get(node.input[i]) if i < len(node.input) and node.input[i] else None
        return tuple(v) if v is not None and all(isinstance(d, int) for d in v) else None

    op = node.op_type
    if op in ("QLinearAdd", "QLinearMul"):
        a, b = s(0), s(3)
        return tuple(np.broadcast_shapes(a, b)) if a is not None and b is not None else None
    if op in ("QLinearSigmoid", "QLinearLeakyRelu"):
        return s(0)
    if op == "QLinearGlobalAveragePool" and s(0) is not None and len(s(0)) >= 3:
        x = s(0)
        return (x[0], *([1] * (len(x) - 2)), x[-1]) if int_attr(node, "channels_last", 0) else (*x[:2], *[1] * (len(x) - 2))
    if op == "QGemm" and s(0) is not None and s(3) is not None and len(s(0)) == len(s(3)) == 2:
        m = s(0)[1] if int_attr(node, "transA", 0) else s(0)[0]
        n = s(3)[0] if int_attr(node, "transB", 0) else s(3)[1]
        return (m, n)
    if op == "QLinearConcat":
        parts = [s(i) for i in range(2, len(node.input), 3)]
        if not parts or any(p is None for p in parts):
            return None
        axis = int_attr(node, "axis", 0) % len(parts[0])
        return (*parts[0][:axis], sum(p[axis] for p in parts), *parts[0][axis + 1:])
    return None


def contrib_value_infos(model: onnx.ModelProto, shapes: dict, dtypes: dict) -> list[onnx.ValueInfoProto]:
    """Value infos for com.microsoft quantized kernels whose output shape inference left unknown and whose input
    shapes are known: added to the graph, a second inference carries the shapes past them."""
    out = []
    for node in model.graph.node:
        if node.domain != "com.microsoft" or not node.output or node.output[0] in shapes:
            continue
        shape = _ms_shape(node, shapes)
        if shape is None:
            continue
        if node.op_type == "QGemm" and (len(node.input) < 8 or not node.input[7]):
            elem = onnx.TensorProto.FLOAT   # no y_scale: a float output
        else:
            elem = dtypes.get(node.input[0], onnx.TensorProto.UINT8)
        out.append(onnx.helper.make_tensor_value_info(node.output[0], elem, list(shape)))
    return out
