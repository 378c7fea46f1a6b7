"""Torch lowerings of the ONNX operators: an eager interpreter's kernels (see spa/torch_graph.py).

Why: gradient-based pruning criteria, layer-by-layer activation capture and fine-tuning need the ONNX graph as
a differentiable torch program, built from the file alone (onnx2torch is not an option: it needs torchvision).

Registry:

    LOWERINGS[op_type] = fn(node, inputs, attrs) -> list[torch.Tensor]

`node` is the onnx.NodeProto, `inputs` the input tensors in order (None for a missing optional input), `attrs`
the decoded attributes (`node_attrs`: strings as str, tensors as torch tensors). `attrs` may also carry
`"_opset"`, the model's default-domain opset, which a few operators need (Softmax before 13 flattens to 2-D,
Resize-10/Upsample use the legacy coordinate rules, Clip/Pad/Slice/Split/Squeeze read attributes in old opsets);
without it the newest semantics apply. Every value computation is a torch op, so autograd flows through
whatever is differentiable; constant integer inputs (shapes, pads, starts, axes, scales of Resize) are read
with `.tolist()`.

The file is organised in sections that follow the pruning-rule modules of this package (conv, linear, norm,
elementwise, pool, shape, concat); a later refactor may move each section next to its rule.

Semantics follow the ONNX spec as implemented by onnxruntime (the project verifies against it). Where the spec leaves
room the onnxruntime behaviour is taken and noted at the operator (Resize-10/Upsample legacy nearest rounding,
linear Resize clamping the source coordinate).

Supported operators (default domain):
  conv:        Conv (1-3 d, groups, dilations, strides, explicit/asymmetric pads, auto_pad), ConvTranspose
               (output_padding, output_shape, groups, dilations, auto_pad)
  linear:      Gemm (alpha, beta, transA, transB, C broadcast), MatMul (batched/broadcast), Einsum
  norm:        BatchNormalization (inference), InstanceNormalization, LayerNormalization (+Mean/InvStdDev
               outputs), GroupNormalization (opset 18 per-group and opset 21 per-channel scale),
               LpNormalization, MeanVarianceNormalization, LRN
  elementwise: Relu, LeakyRelu, PRelu, Sigmoid, HardSigmoid, HardSwish, Gelu, Erf, Tanh, Softplus, Softsign,
               Exp, Log, Sqrt, Abs, Neg, Reciprocal, Floor, Ceil, Round, Sign, Sin, Cos, Tan, Elu, Selu, Celu,
               ThresholdedRelu, Mish, Swish, Relu6, Shrink, Identity, Dropout (inference: identity), Cast,
               CastLike, Not, IsNaN, IsInf, Clip, Add, Sub, Mul, Div, Pow, Mod, Max, Min, Sum, Mean, Where,
               Equal, Less, Greater, LessOrEqual, GreaterOrEqual, And, Or, Xor, BitShift, BitwiseAnd,
               BitwiseOr, BitwiseXor, BitwiseNot, QuantizeLinear, DequantizeLinear (per-tensor and per-axis)
  pool:        MaxPool (ceil_mode, pads, dilations, auto_pad, Indices output with storage_order),
               AveragePool (count_include_pad, ceil_mode, dilations), LpPool, GlobalAveragePool,
               GlobalMaxPool, GlobalLpPool, ReduceMean/Sum/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare (axes
               as attribute or input, keepdims, noop_with_empty_axes), ArgMax/ArgMin (select_last_index),
               Softmax/LogSoftmax/Hardmax (opset < 13 coerce to 2-D), CumSum, TopK, Resize (nearest with all
               nearest_modes, linear, cubic incl. exclude_outside; every coordinate_transformation_mode incl.
               tf_crop_and_resize; scales or sizes; axes; keep_aspect_ratio_policy), Upsample, Pad (constant,
               reflect, edge, wrap; axes)
  shape:       Reshape (0, -1, allowzero), Flatten, Transpose, Squeeze, Unsqueeze, Expand, Tile, Shape
               (start/end), Size, ConstantOfShape, Constant, Range, DepthToSpace, SpaceToDepth, Trilu, NonZero,
               OneHot
  concat:      Concat, Split (split attr/input, num_outputs, equal), Slice (negative/INT_MAX ends, negative
               steps, opset < 10 attributes), Gather (negative indices), GatherElements

Not supported (TorchGraph raises SpaError naming the node): MaxRoiPool, Resize antialias=1, GatherND,
ScatterND/ScatterElements, NonMaxSuppression, RoiAlign, the quantized kernels (QLinearConv, QLinearMatMul,
ConvInteger, MatMulInteger, DynamicQuantizeLinear), QuantizeLinear/DequantizeLinear block_size > 0 and float8
types, random ops, sequence/optional ops, string tensors, control flow with subgraphs (If, Loop, Scan), and
every other domain (com.microsoft, ...).

ai.onnx.ml: ArrayFeatureExtractor only (skl2onnx's classifiers end with it).

Notes:
  * QuantizeLinear returns the integer type of its zero point, except when its input requires grad and grad
    mode is on: then it returns a float tensor holding the same integer values, rounded with a
    straight-through estimator, so that gradients flow through Q -> DQ pairs. DequantizeLinear accepts both.
  * BatchNormalization is written as a per-channel affine so that mean/var/scale/bias all get gradients
    (F.batch_norm in eval mode gives none to the running statistics).
  * Dropout is the inference identity whatever training_mode says.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

LATEST_OPSET = 21

LOWERINGS: dict[str, Callable] = {}


def lower(*op_types: str):
    """Decorator: register `fn(node, inputs, attrs) -> list[Tensor]` for the given default-domain op types."""
    def register(fn):
        for t in op_types:
            LOWERINGS[t] = fn
        return fn

    return register


# ai.onnx.ml: the few operators converters of classic ML models put around a network (skl2onnx maps a
# classifier's argmax to its class labels with ArrayFeatureExtractor)
ML_LOWERINGS: dict[str, Callable] = {}


def lowering(op_type: str, domain: str = "") -> Callable | None:
    """The lowering of an op type, or None (other domains than the default and ai.onnx.ml have none). See also
    `unsupported`."""
    if domain == "ai.onnx.ml":
        return ML_LOWERINGS.get(op_type)
    if domain not in ("", "ai.onnx"):
        return None
    return LOWERINGS.get(op_type)


# ---- dtypes and attributes ----------------------------------------------------------------------------------------
DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16, TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool, TensorProto.UINT16: torch.uint16, TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        return DTYPES[onnx_type]
    except KeyError:
        raise NotImplementedError(f"ONNX element type {TensorProto.DataType.Name(onnx_type)} has no torch lowering")


def tensor_from_proto(t: onnx.TensorProto) -> torch.Tensor:
    """A TensorProto (initializer or attribute) as a fresh torch tensor."""
    torch_dtype(t.data_type)  # clear error for unsupported element types
    arr = np.array(numpy_helper.to_array(t))  # writable copy (0-d stays 0-d)
    return torch.from_numpy(arr)


def node_attrs(node: onnx.NodeProto, opset: int | None = None) -> dict:
    """Decoded attributes of a node (bytes -> str, TensorProto -> torch tensor), plus "_opset" when given."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode() for s in v]
        elif isinstance(v, onnx.TensorProto):
            v = tensor_from_proto(v)
        out[a.name] = v
    if opset is not None:
        out["_opset"] = opset
    return out


_RESIZE_MODES = {"nearest", "linear", "bilinear", "trilinear", "cubic"}
_CTMS = {"half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
         "tf_half_pixel_for_nearest", "tf_crop_and_resize"}
_NEAREST_MODES = {"round_prefer_floor", "round_prefer_ceil", "floor", "ceil"}


def unsupported(node: onnx.NodeProto, attrs: dict) -> str | None:
    """Why a node that has a lowering still cannot run (an attribute value the lowering does not implement),
    decided from the node alone so that TorchGraph can refuse it at construction; None when it can run."""
    op = node.op_type
    if op in ("Resize", "Upsample"):
        if attrs.get("antialias", 0):
            return "antialias=1 is not supported"
        if attrs.get("mode", "nearest") not in _RESIZE_MODES:
            return f"mode={attrs.get('mode')!r} is not supported"
        if attrs.get("coordinate_transformation_mode", "half_pixel") not in _CTMS:
            return f"coordinate_transformation_mode={attrs.get('coordinate_transformation_mode')!r} is unknown"
        if attrs.get("nearest_mode", "round_prefer_floor") not in _NEAREST_MODES:
            return f"nearest_mode={attrs.get('nearest_mode')!r} is unknown"
    elif op == "BatchNormalization" and attrs.get("training_mode", 0):
        return "training_mode=1 is not supported (inference only)"
    elif op in ("QuantizeLinear", "DequantizeLinear") and int(attrs.get("block_size", 0) or 0) > 0:
        return "blocked quantization (block_size > 0) is not supported"
    elif op == "Pad" and attrs.get("mode", "constant") not in ("constant", "reflect", "edge", "wrap"):
        return f"mode={attrs.get('mode')!r} is unknown"
    elif op == "Cast" and int(attrs.get("to", 0)) not in DTYPES:
        return f"casting to {TensorProto.DataType.Name(int(attrs.get('to', 0)))} is not supported"
    elif op == "Constant" and not ({"value", "value_float", "value_floats", "value_int", "value_ints"} & set(attrs)):
        return "only numeric tensor values are supported"
    return None


# ---- small helpers ------------------------------------------------------------------------------------------------
def _opt(inputs, i):
    return inputs[i] if i < len(inputs) else None


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _opset(attrs) -> int:
    return attrs.get("_opset", LATEST_OPSET)


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def _torch_pad(begin, end) -> list[int]:
    """ONNX-style per-axis (begin, end) for the trailing axes -> F.pad's last-axis-first list."""
    out = []
    for b, e in zip(reversed(list(begin)), reversed(list(end))):
        out += [int(b), int(e)]
    return out


def _same_pads(auto_pad, in_size, k_eff, stride):
    """Begin/end padding for auto_pad SAME_UPPER (extra at the end) or SAME_LOWER (extra at the start)."""
    out = -(-in_size // stride)
    total = max(0, (out - 1) * stride + k_eff - in_size)
    small = total // 2
    return (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)


def _per_axis(t: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """A 1-D per-axis parameter (quantization scale, ...) shaped to broadcast along `axis` of a rank-`rank`
    tensor; scalars and 1-element tensors are returned as they are."""
    if t.dim() == 1 and t.numel() > 1:
        shape = [1] * rank
        shape[axis] = -1
        return t.reshape(shape)
    return t


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial(table, n, what):
    fn = table.get(n)
    if fn is None:
        raise NotImplementedError(f"{what} with {n} spatial dimensions has no torch lowering (1-3 supported)")
    return fn


# ==== conv (operators/conv.py) =====================================================================================
def _conv_pads(attrs, in_spatial, k_eff, strides):
    n = len(in_spatial)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        be = [_same_pads(auto, in_spatial[i], k_eff[i], strides[i]) for i in range(n)]
        return [b for b, _ in be], [e for _, e in be]
    if auto == "VALID":
        return [0] * n, [0] * n
    pads = list(attrs.get("pads") or [0] * (2 * n))
    return pads[:n], pads[n:]


@lower("Conv")
def conv(node, inputs, attrs):
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = w.dim() - 2
    strides = list(attrs.get("strides") or [1] * n)
    dil = list(attrs.get("dilations") or [1] * n)
    k_eff = [(w.shape[2 + i] - 1) * dil[i] + 1 for i in range(n)]
    begin, end = _conv_pads(attrs, list(x.shape[2:]), k_eff, strides)
    if begin == end:
        padding = begin
    else:
        x = F.pad(x, _torch_pad(begin, end))
        padding = 0
    return [_spatial(_CONV, n, "Conv")(x, w, b, strides, padding, dil, int(attrs.get("group", 1)))]


@lower("ConvTranspose")
def conv_transpose(node, inputs, attrs):
    """Output length per axis: stride*(in-1) + output_padding + (k-1)*dilation + 1 - pad_begin - pad_end.

    With output_shape (or auto_pad SAME_*, whose output is in*stride) the total padding is derived from the
    wanted size and split as the spec says (and onnxruntime 1.31 does): SAME_UPPER puts the odd unit at the
    end, NOTSET/SAME_LOWER at the start."""
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = w.dim() - 2
    group = int(attrs.get("group", 1))
    strides = list(attrs.get("strides") or [1] * n)
    dil = list(attrs.get("dilations") or [1] * n)
    outpad = list(attrs.get("output_padding") or [0] * n)
    in_sp = list(x.shape[2:])
    k_eff = [(w.shape[2 + i] - 1) * dil[i] + 1 for i in range(n)]
    full = [(in_sp[i] - 1) * strides[i] + k_eff[i] for i in range(n)]  # before padding and output_padding
    auto = attrs.get("auto_pad", "NOTSET")
    out_shape = list(attrs.get("output_shape") or [])[-n:] if attrs.get("output_shape") else None
    if out_shape is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        out_shape = [in_sp[i] * strides[i] for i in range(n)]
    if out_shape is not None:
        begin, length = [], []
        for i in range(n):
            total = max(0, full[i] + outpad[i] - out_shape[i])
            begin.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
            length.append(out_shape[i])
    else:
        pads = list(attrs.get("pads") or [0] * (2 * n)) if auto == "NOTSET" else [0] * (2 * n)
        begin = pads[:n]
        length = [full[i] + outpad[i] - pads[i] - pads[n + i] for i in range(n)]
    end = [length[i] - (full[i] - begin[i]) for i in range(n)]  # > 0: zero rows (output_padding), < 0: crop
    fn = _spatial(_CONV_T, n, "ConvTranspose")
    if all(-end[i] == begin[i] for i in range(n)):  # symmetric padding: torch does it directly
        return [fn(x, w, b, strides, begin, 0, group, dil)]
    if all(end[i] >= -begin[i] and end[i] + begin[i] < max(strides[i], dil[i]) for i in range(n)):
        # symmetric padding plus a torch-legal output_padding
        return [fn(x, w, b, strides, begin, [end[i] + begin[i] for i in range(n)], group, dil)]
    y = fn(x, w, None, strides, 0, 0, group, dil)
    y = F.pad(y, _torch_pad([-v for v in begin], end))
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * n)
    return [y]


# ==== linear (operators/linear.py) =================================================================================
@lower("Gemm")
def gemm(node, inputs, attrs):
    a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if c is None or beta == 0.0:
        y = a @ b
        return [y * alpha if alpha != 1.0 else y]
    return [torch.addmm(c, a, b, beta=beta, alpha=alpha)]


@lower("MatMul")
def matmul(node, inputs, attrs):
    return [torch.matmul(inputs[0], inputs[1])]


@lower("Einsum")
def einsum(node, inputs, attrs):
    return [torch.einsum(attrs["equation"], *inputs)]


# ==== norm (operators/norm.py) =====================================================================================
@lower("BatchNormalization")
def batch_norm(node, inputs, attrs):
    x, scale, bias, mean, var = inputs[:5]
    if attrs.get("training_mode", 0):
        raise NotImplementedError("BatchNormalization training_mode=1 has no torch lowering (inference only)")
    eps = float(attrs.get("epsilon", 1e-5))
    s = scale * torch.rsqrt(var + eps)
    shift = bias - mean * s
    shape = [1, -1] + [1] * (x.dim() - 2)
    return [x * s.reshape(shape) + shift.reshape(shape)]


@lower("InstanceNormalization")
def instance_norm(node, inputs, attrs):
    x, scale, bias = inputs[:3]
    return [F.instance_norm(x, weight=scale, bias=bias, eps=float(attrs.get("epsilon", 1e-5)))]


@lower("LayerNormalization")
def layer_norm(node, inputs, attrs):
    x, scale, bias = inputs[0], inputs[1], _opt(inputs, 2)
    axis = _axis(int(attrs.get("axis", -1)), x.dim())
    eps = float(attrs.get("epsilon", 1e-5))
    shape = tuple(x.shape[axis:])
    stats = len([o for o in node.output[1:] if o]) > 0
    if not stats and tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return [F.layer_norm(x, shape, scale, bias, eps)]
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    d = x - mean
    inv = torch.rsqrt((d * d).mean(dims, keepdim=True) + eps)
    y = d * inv * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv]


@lower("GroupNormalization")
def group_norm(node, inputs, attrs):
    x, scale, bias = inputs[:3]
    groups = int(attrs["num_groups"])
    c = x.shape[1]
    if scale.numel() == groups and groups != c:  # opset 18: one scale/bias per group
        scale = scale.repeat_interleave(c // groups)
        bias = bias.repeat_interleave(c // groups)
    return [F.group_norm(x, groups, scale, bias, float(attrs.get("epsilon", 1e-5)))]


@lower("LpNormalization")
def lp_normalization(node, inputs, attrs):
    x = inputs[0]
    norm = torch.linalg.vector_norm(x, ord=int(attrs.get("p", 2)), dim=int(attrs.get("axis", -1)), keepdim=True)
    return [x / torch.where(norm == 0, torch.ones_like(norm), norm)]


@lower("MeanVarianceNormalization")
def mean_variance_normalization(node, inputs, attrs):
    """The ONNX function body: (X - E[X]) / (sqrt(E[X^2] - E[X]^2) + 1e-9)."""
    x = inputs[0]
    axes = tuple(_axis(a, x.dim()) for a in attrs.get("axes", [0, 2, 3]))
    mean = x.mean(axes, keepdim=True)
    var = (x * x).mean(axes, keepdim=True) - mean * mean
    return [(x - mean) / (torch.sqrt(var) + 1e-9)]


@lower("LRN")
def lrn(node, inputs, attrs):
    """y = x / (bias + alpha/size * sum of x^2 over channels [c - floor((size-1)/2), c + ceil((size-1)/2)])^beta.
    (torch's local_response_norm centres even windows the other way, hence written out.)"""
    x = inputs[0]
    size = int(attrs["size"])
    alpha, beta, bias = float(attrs.get("alpha", 1e-4)), float(attrs.get("beta", 0.75)), float(attrs.get("bias", 1.0))
    c = x.shape[1]
    sq = x * x
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = F.pad(sq.transpose(1, -1), [lo, hi]).transpose(1, -1)
    total = functools.reduce(torch.add, [sq.narrow(1, i, c) for i in range(size)])
    return [x / (bias + (alpha / size) * total) ** beta]


# ==== elementwise (operators/elementwise.py) =======================================================================
def _unary(fn):
    return lambda node, inputs, attrs: [fn(inputs[0])]


for _op, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin,
    "Cos": torch.cos, "Tan": torch.tan, "Softsign": F.softsign, "Mish": F.mish, "Not": torch.logical_not,
    "IsNaN": torch.isnan, "BitwiseNot": torch.bitwise_not, "Relu6": lambda x: torch.clamp(x, 0.0, 6.0),
    "Identity": lambda x: x,
}.items():
    LOWERINGS[_op] = _unary(_fn)


@lower("Softplus")
def softplus(node, inputs, attrs):
    return [F.softplus(inputs[0])]


@lower("LeakyRelu")
def leaky_relu(node, inputs, attrs):
    return [F.leaky_relu(inputs[0], float(attrs.get("alpha", 0.01)))]


@lower("PRelu")
def prelu(node, inputs, attrs):
    x, slope = inputs[0], inputs[1]
    return [torch.where(x < 0, x * slope, x)]


@lower("HardSigmoid")
def hard_sigmoid(node, inputs, attrs):
    x = inputs[0]
    return [torch.clamp(x * float(attrs.get("alpha", 0.2)) + float(attrs.get("beta", 0.5)), 0.0, 1.0)]


@lower("HardSwish")
def hard_swish(node, inputs, attrs):
    x = inputs[0]
    return [x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)]


@lower("Gelu")
def gelu(node, inputs, attrs):
    return [F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))]


@lower("Elu")
def elu(node, inputs, attrs):
    return [F.elu(inputs[0], float(attrs.get("alpha", 1.0)))]


@lower("Celu")
def celu(node, inputs, attrs):
    return [F.celu(inputs[0], float(attrs.get("alpha", 1.0)))]


@lower("Selu")
def selu(node, inputs, attrs):
    x = inputs[0]
    alpha = float(attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(attrs.get("gamma", 1.05070102214813232421875))
    return [gamma * torch.where(x > 0, x, alpha * torch.expm1(torch.clamp(x, max=0.0)))]


@lower("ThresholdedRelu")
def thresholded_relu(node, inputs, attrs):
    x = inputs[0]
    return [torch.where(x > float(attrs.get("alpha", 1.0)), x, torch.zeros_like(x))]


@lower("Shrink")
def shrink(node, inputs, attrs):
    x = inputs[0]
    lambd, bias = float(attrs.get("lambd", 0.5)), float(attrs.get("bias", 0.0))
    return [torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))]


@lower("Swish")
def swish(node, inputs, attrs):
    x = inputs[0]
    return [x * torch.sigmoid(float(attrs.get("alpha", 1.0)) * x)]


@lower("IsInf")
def is_inf(node, inputs, attrs):
    x = inputs[0]
    neg, pos = attrs.get("detect_negative", 1), attrs.get("detect_positive", 1)
    if neg and pos:
        return [torch.isinf(x)]
    if pos:
        return [torch.isposinf(x)]
    if neg:
        return [torch.isneginf(x)]
    return [torch.zeros_like(x, dtype=torch.bool)]


@lower("Dropout")
def dropout(node, inputs, attrs):
    x = inputs[0]
    out = [x]
    if len(node.output) > 1 and node.output[1]:
        out.append(torch.ones_like(x, dtype=torch.bool))
    return out


@lower("Cast")
def cast(node, inputs, attrs):
    return [inputs[0].to(torch_dtype(int(attrs["to"])))]


@lower("CastLike")
def cast_like(node, inputs, attrs):
    return [inputs[0].to(inputs[1].dtype)]


@lower("Clip")
def clip(node, inputs, attrs):
    x = inputs[0]
    if _opset(attrs) < 11 or "min" in attrs or "max" in attrs:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo, hi = _opt(inputs, 1), _opt(inputs, 2)
    if lo is None and hi is None:
        return [x]
    return [torch.clamp(x, lo, hi)]


def _binary(fn):
    return lambda node, inputs, attrs: [fn(inputs[0], inputs[1])]


for _op, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq, "Less": torch.lt,
    "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or, "BitwiseXor": torch.bitwise_xor,
}.items():
    LOWERINGS[_op] = _binary(_fn)


@lower("Div")
def div(node, inputs, attrs):
    a, b = inputs[0], inputs[1]
    if a.is_floating_point():
        return [a / b]
    return [torch.div(a, b, rounding_mode="trunc")]  # C++ integer division, as onnxruntime


@lower("Pow")
def pow_(node, inputs, attrs):
    y = torch.pow(inputs[0], inputs[1])
    return [y if y.dtype == inputs[0].dtype else y.to(inputs[0].dtype)]  # the output has the base's type


@lower("Mod")
def mod(node, inputs, attrs):
    fn = torch.fmod if attrs.get("fmod", 0) else torch.remainder  # fmod=0: the divisor's sign, like Python
    return [fn(inputs[0], inputs[1])]


@lower("BitShift")
def bit_shift(node, inputs, attrs):
    fn = torch.bitwise_left_shift if attrs["direction"] == "LEFT" else torch.bitwise_right_shift
    return [fn(inputs[0], inputs[1])]


def _variadic(fn):
    return lambda node, inputs, attrs: [functools.reduce(fn, [t for t in inputs if t is not None])]


LOWERINGS["Sum"] = _variadic(torch.add)
LOWERINGS["Max"] = _variadic(torch.maximum)
LOWERINGS["Min"] = _variadic(torch.minimum)


@lower("Mean")
def mean(node, inputs, attrs):
    xs = [t for t in inputs if t is not None]
    return [functools.reduce(torch.add, xs) / len(xs)]


@lower("Where")
def where(node, inputs, attrs):
    return [torch.where(inputs[0], inputs[1], inputs[2])]


_INT_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535),
              torch.int16: (-32768, 32767), torch.int32: (-2 ** 31, 2 ** 31 - 1)}


def _q_axis(attrs, x, scale):
    if int(attrs.get("block_size", 0) or 0) > 0:
        raise NotImplementedError("blocked quantization (block_size > 0) has no torch lowering")
    return _axis(int(attrs.get("axis", 1)), x.dim())


@lower("QuantizeLinear")
def quantize_linear(node, inputs, attrs):
    """y = saturate(round_half_even(x / scale) + zero_point), in the zero point's type (uint8 without one).
    When x requires grad the result stays a float tensor of integer values and the rounding is a
    straight-through estimator (identity gradient inside the range)."""
    x, scale, zp = inputs[0], inputs[1], _opt(inputs, 2)
    axis = _q_axis(attrs, x, scale)
    if zp is not None:
        qtype = zp.dtype
    elif attrs.get("output_dtype"):
        qtype = torch_dtype(int(attrs["output_dtype"]))
    else:
        qtype = torch.uint8
    if qtype not in _INT_RANGE:
        raise NotImplementedError(f"QuantizeLinear to {qtype} has no torch lowering")
    lo, hi = _INT_RANGE[qtype]
    scale = _per_axis(scale, axis, x.dim())
    ste = x.requires_grad and torch.is_grad_enabled()
    y = x / scale
    r = torch.round(y)
    if ste:
        r = y + (r - y).detach()
    if zp is not None:
        r = r + _per_axis(zp, axis, x.dim()).to(r.dtype)
    q = torch.clamp(r, lo, hi)
    return [q if ste else q.to(qtype)]


@lower("DequantizeLinear")
def dequantize_linear(node, inputs, attrs):
    x, scale, zp = inputs[0], inputs[1], _opt(inputs, 2)
    axis = _q_axis(attrs, x, scale)
    if zp is not None:
        zp = _per_axis(zp, axis, x.dim())
    if x.is_floating_point():  # the straight-through float carrier of QuantizeLinear
        v = x - zp.to(x.dtype) if zp is not None else x
        v = v.to(scale.dtype)
    else:
        v = x.to(torch.int64)
        if zp is not None:
            v = v - zp.to(torch.int64)
        v = v.to(scale.dtype)
    return [v * _per_axis(scale, axis, x.dim())]


# ==== pool (operators/pool.py) =====================================================================================
def _pool_geometry(attrs, in_spatial):
    """Kernel, strides, dilations, begin padding, the (possibly negative) padding to add after the input so
    that a padding-free floor-mode pool yields exactly the ONNX output, and the explicit end pads."""
    k = list(attrs["kernel_shape"])
    n = len(k)
    s = list(attrs.get("strides") or [1] * n)
    d = list(attrs.get("dilations") or [1] * n)
    k_eff = [(k[i] - 1) * d[i] + 1 for i in range(n)]
    auto = attrs.get("auto_pad", "NOTSET")
    ceil_mode = int(attrs.get("ceil_mode", 0))
    begin, end, out = [], [], []
    for i in range(n):
        size = in_spatial[i]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            b, e = _same_pads(auto, size, k_eff[i], s[i])
        elif auto == "VALID":
            b, e = 0, 0
        else:
            pads = list(attrs.get("pads") or [0] * (2 * n))
            b, e = pads[i], pads[n + i]
        span = size + b + e - k_eff[i]
        if ceil_mode:
            o = -(-span // s[i]) + 1
            if (o - 1) * s[i] >= size + b:  # a window may not start in the right padding
                o -= 1
        else:
            o = span // s[i] + 1
        begin.append(b)
        end.append(e)
        out.append(o)
    right = [(out[i] - 1) * s[i] + k_eff[i] - in_spatial[i] - begin[i] for i in range(n)]
    return k, s, d, k_eff, begin, end, right, ceil_mode


def _torch_pool_ok(k, begin, end):
    """torch's own padding (symmetric, at most half the kernel) reproduces the ONNX windows, also in ceil
    mode (torch drops a last window that would start in the right padding, as ONNX does)."""
    return begin == end and all(2 * b <= kk for b, kk in zip(begin, k))


@lower("MaxPool")
def max_pool(node, inputs, attrs):
    x = inputs[0]
    n = x.dim() - 2
    in_sp = list(x.shape[2:])
    k, s, d, _, begin, end, right, ceil_mode = _pool_geometry(attrs, in_sp)
    fn = _spatial(_MAXPOOL, n, "MaxPool")
    want_idx = len(node.output) > 1 and bool(node.output[1])
    if _torch_pool_ok(k, begin, end):
        res = fn(x, k, s, begin, d, ceil_mode=bool(ceil_mode), return_indices=want_idx)
        padded, offset = in_sp, [0] * n
    else:
        low = -math.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
        xp = F.pad(x, _torch_pad(begin, right), value=low)
        res = fn(xp, k, s, 0, d, ceil_mode=False, return_indices=want_idx)
        padded, offset = list(xp.shape[2:]), begin
    if not want_idx:
        return [res]
    y, idx = res
    # torch: flat index into the (padded) spatial plane; ONNX: flat index into the whole (N, C, spatial) input
    coords, rest = [], idx
    for size in reversed(padded):
        coords.append(rest % size)
        rest = rest // size
    coords = [c - o for c, o in zip(reversed(coords), offset)]
    flat = torch.zeros_like(idx)
    if int(attrs.get("storage_order", 0)):
        stride = 1
        for i in range(n):
            flat = flat + coords[i] * stride
            stride *= in_sp[i]
    else:
        for i in range(n):
            flat = flat * in_sp[i] + coords[i]
    plane = _prod(in_sp)
    nc = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape([x.shape[0], x.shape[1]] + [1] * n)
    return [y, flat + nc * plane]


def _window_sum(x, k, s, d, begin, right, value=0.0):
    """Sum over pooling windows of x padded by (begin, right), as a depthwise convolution with a ones kernel."""
    n = x.dim() - 2
    c = x.shape[1]
    xp = F.pad(x, _torch_pad(begin, right), value=value)
    w = torch.ones([c, 1] + list(k), dtype=x.dtype, device=x.device)
    return _spatial(_CONV, n, "pooling")(xp, w, None, s, 0, d, c)


@lower("AveragePool")
def average_pool(node, inputs, attrs):
    x = inputs[0]
    n = x.dim() - 2
    in_sp = list(x.shape[2:])
    k, s, d, _, begin, end, right, ceil_mode = _pool_geometry(attrs, in_sp)
    include = bool(attrs.get("count_include_pad", 0))
    if not ceil_mode and all(v == 1 for v in d) and _torch_pool_ok(k, begin, end):
        return [_spatial(_AVGPOOL, n, "AveragePool")(x, k, s, begin, False, include)]
    total = _window_sum(x, k, s, d, begin, right)
    ones = torch.ones([1, 1] + in_sp, dtype=x.dtype, device=x.device)
    if include:  # explicit pads count, the ceil-mode overhang past them does not
        ones = F.pad(ones, _torch_pad(begin, end), value=1.0)
        count = _window_sum(ones, k, s, d, [0] * n, [r - e for r, e in zip(right, end)])
    else:
        count = _window_sum(ones, k, s, d, begin, right)
    return [total / count]


@lower("LpPool")
def lp_pool(node, inputs, attrs):
    x = inputs[0]
    p = float(attrs.get("p", 2))
    k, s, d, _, begin, _, right, _ = _pool_geometry(attrs, list(x.shape[2:]))
    return [_window_sum(x.abs() ** p, k, s, d, begin, right) ** (1.0 / p)]


@lower("GlobalAveragePool")
def global_average_pool(node, inputs, attrs):
    x = inputs[0]
    return [x.mean(tuple(range(2, x.dim())), keepdim=True)]


@lower("GlobalMaxPool")
def global_max_pool(node, inputs, attrs):
    x = inputs[0]
    return [x.amax(tuple(range(2, x.dim())), keepdim=True)]


@lower("GlobalLpPool")
def global_lp_pool(node, inputs, attrs):
    x = inputs[0]
    return [torch.linalg.vector_norm(x, ord=float(attrs.get("p", 2)), dim=tuple(range(2, x.dim())), keepdim=True)]


def _reduce_axes(inputs, attrs, rank):
    """Reduction axes (attribute in old opsets, input from 13/18), None for "no reduction"."""
    axes = attrs.get("axes")
    if axes is None and _opt(inputs, 1) is not None:
        axes = _ints(inputs[1])
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return None
        return tuple(range(rank))
    return tuple(sorted({_axis(int(a), rank) for a in axes}))


def _reducer(pre, red, post=None, noop=None):
    """A reduction: post(red(pre(x), axes, keepdims)). With no axes and noop_with_empty_axes the element-wise
    part still applies, as in onnxruntime (ReduceL2 -> |x|, ReduceSumSquare -> x*x, ReduceLogSum -> log x)."""
    def fn(node, inputs, attrs):
        x = inputs[0]
        axes = _reduce_axes(inputs, attrs, x.dim())
        if axes is None or x.dim() == 0:
            return [noop(x) if noop else x]
        v = pre(x) if pre else x
        y = red(v, axes, bool(attrs.get("keepdims", 1)))
        return [post(y) if post else y]

    return fn


def _prod_reduce(v, axes, keep):
    for a in sorted(axes, reverse=True):
        v = v.prod(a, keepdim=True)
    return v if keep else v.squeeze(axes)


def _sum(v, a, k):
    return v.sum(a, keepdim=k)


LOWERINGS.update({
    "ReduceMean": _reducer(None, lambda v, a, k: v.mean(a, keepdim=k)),
    "ReduceSum": _reducer(None, _sum),
    "ReduceMax": _reducer(None, lambda v, a, k: v.amax(a, keepdim=k)),
    "ReduceMin": _reducer(None, lambda v, a, k: v.amin(a, keepdim=k)),
    "ReduceProd": _reducer(None, _prod_reduce),
    "ReduceL1": _reducer(torch.abs, _sum, None, torch.abs),
    "ReduceL2": _reducer(lambda v: v * v, _sum, torch.sqrt, torch.abs),
    "ReduceLogSum": _reducer(None, _sum, torch.log, torch.log),
    "ReduceLogSumExp": _reducer(None, lambda v, a, k: torch.logsumexp(v, a, keepdim=k)),
    "ReduceSumSquare": _reducer(lambda v: v * v, _sum, None, lambda v: v * v),
})


@lower("ArgMax", "ArgMin")
def arg_max_min(node, inputs, attrs):
    x = inputs[0]
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    keep = bool(attrs.get("keepdims", 1))
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    if attrs.get("select_last_index", 0):
        i = fn(x.flip(axis), dim=axis, keepdim=keep)
        return [x.shape[axis] - 1 - i]
    return [fn(x, dim=axis, keepdim=keep)]


def _hardmax(x, dim):
    idx = x.argmax(dim, keepdim=True)
    return torch.zeros_like(x).scatter(dim, idx, 1.0)


_SOFTMAX = {"Softmax": lambda x, d: torch.softmax(x, d), "LogSoftmax": lambda x, d: torch.log_softmax(x, d),
            "Hardmax": _hardmax}


@lower("Softmax", "LogSoftmax", "Hardmax")
def softmax(node, inputs, attrs):
    """Opset >= 13: along `axis` (default -1). Before 13: the input is coerced to 2-D
    [prod(shape[:axis]), prod(shape[axis:])] (default axis 1) and normalised over the second dimension."""
    x = inputs[0]
    fn = _SOFTMAX[node.op_type]
    if _opset(attrs) >= 13:
        return [fn(x, _axis(int(attrs.get("axis", -1)), x.dim()))]
    axis = _axis(int(attrs.get("axis", 1)), x.dim())
    shape = x.shape
    y = fn(x.reshape(_prod(shape[:axis]), _prod(shape[axis:])), 1)
    return [y.reshape(shape)]


@lower("CumSum")
def cumsum(node, inputs, attrs):
    x = inputs[0]
    axis = _axis(_ints(inputs[1])[0], x.dim())
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    y = x.cumsum(axis, dtype=x.dtype)
    if attrs.get("exclusive", 0):
        y = torch.cat([torch.zeros_like(x.narrow(axis, 0, 1)), y.narrow(axis, 0, x.shape[axis] - 1)], axis)
    if attrs.get("reverse", 0):
        y = y.flip(axis)
    return [y]


@lower("TopK")
def topk(node, inputs, attrs):
    x = inputs[0]
    k = _ints(inputs[1])[0] if len(inputs) > 1 else int(attrs["k"])  # opset 1-9: attribute
    axis = _axis(int(attrs.get("axis", -1)), x.dim())
    values, indices = torch.topk(x, k, dim=axis, largest=bool(attrs.get("largest", 1)), sorted=True)
    return [values, indices]


# ---- Resize ---------------------------------------------------------------------------------------------------------
def _source_coords(ctm, n_in, n_out, scale, roi_start, roi_end):
    """x_original for every output position (float32, onnxruntime's formulas and evaluation order)."""
    f32 = torch.float32
    xr = torch.arange(n_out, dtype=f32)
    s = torch.tensor(scale, dtype=f32)
    if ctm == "half_pixel":
        return (xr + 0.5) / s - 0.5
    if ctm == "half_pixel_symmetric":
        adj = torch.tensor(float(n_out), dtype=f32) / (s * n_in)
        center = torch.tensor(n_in / 2.0, dtype=f32)
        return center * (1 - adj) + (xr + 0.5) / s - 0.5
    if ctm == "pytorch_half_pixel":
        return (xr + 0.5) / s - 0.5 if n_out > 1 else torch.zeros(n_out, dtype=f32)
    if ctm == "align_corners":
        return xr * (n_in - 1) / (n_out - 1) if n_out > 1 else torch.zeros(n_out, dtype=f32)
    if ctm == "asymmetric":
        return xr / s
    if ctm == "tf_half_pixel_for_nearest":
        return (xr + 0.5) / s
    if ctm == "tf_crop_and_resize":
        start, end = torch.tensor(roi_start, dtype=f32), torch.tensor(roi_end, dtype=f32)
        if n_out > 1:
            return start * (n_in - 1) + xr * (end - start) * (n_in - 1) / (n_out - 1)
        return torch.full((n_out,), 0.5, dtype=f32) * (start + end) * (n_in - 1)
    raise NotImplementedError(f"Resize coordinate_transformation_mode={ctm!r} has no torch lowering")


def _nearest_index(xo, mode, downsampling):
    if mode == "round_prefer_floor":
        return torch.ceil(xo - 0.5)
    if mode == "round_prefer_ceil":
        return torch.floor(xo + 0.5)
    if mode == "floor":
        return torch.floor(xo)
    if mode == "ceil":
        return torch.ceil(xo)
    if mode == "simple":  # onnxruntime's rule for Resize-10 and Upsample
        return torch.ceil(xo) if downsampling else torch.trunc(xo)
    raise NotImplementedError(f"Resize nearest_mode={mode!r} has no torch lowering")


def _cubic_coeffs(t, a):
    """Keys cubic weights of the 4 neighbours floor(x)-1 .. floor(x)+2 for fractional offsets t."""
    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_axis(x, axis, n_out, scale, mode, ctm, nearest_mode, cubic_a, exclude_outside, roi, extrapolation):
    n_in = x.shape[axis]
    xo = _source_coords(ctm, n_in, n_out, scale, *roi)
    view = [1] * x.dim()
    view[axis] = n_out
    dev = x.device
    outside = None
    if ctm == "tf_crop_and_resize":
        outside = (xo < 0) | (xo > n_in - 1)
    if mode == "nearest":
        idx = _nearest_index(xo, nearest_mode, scale < 1).clamp(0, n_in - 1).to(torch.int64)
        y = x.index_select(axis, idx.to(dev))
    elif mode == "linear":
        xc = xo.clamp(0, n_in - 1)
        i0 = torch.floor(xc).to(torch.int64).clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        w1 = (xc - i0).to(x.dtype).to(dev).reshape(view)
        y = x.index_select(axis, i0.to(dev)) * (1 - w1) + x.index_select(axis, i1.to(dev)) * w1
    elif mode == "cubic":
        base = torch.floor(xo)
        coeffs = _cubic_coeffs(xo - base, cubic_a)
        base = base.to(torch.int64)
        idxs = [base - 1 + j for j in range(4)]
        if exclude_outside:
            coeffs = [torch.where((i < 0) | (i > n_in - 1), torch.zeros_like(c), c) for c, i in zip(coeffs, idxs)]
            total = functools.reduce(torch.add, coeffs)
            coeffs = [c / total for c in coeffs]
        y = None
        for c, i in zip(coeffs, idxs):
            term = x.index_select(axis, i.clamp(0, n_in - 1).to(dev)) * c.to(x.dtype).to(dev).reshape(view)
            y = term if y is None else y + term
    else:
        raise NotImplementedError(f"Resize mode={mode!r} has no torch lowering")
    if outside is not None and bool(outside.any()):
        y = torch.where(outside.to(dev).reshape(view), torch.full_like(y, extrapolation), y)
    return y


@lower("Resize", "Upsample")
def resize(node, inputs, attrs):
    """Separable resampling along each resized axis with onnxruntime's coordinate arithmetic (float32):
    nearest (round_prefer_floor/ceil, floor, ceil), linear (x_original clamped to the input, like
    onnxruntime), cubic (Keys with cubic_coeff_a; exclude_outside). Resize-10 and Upsample use
    onnxruntime's legacy rules: asymmetric coordinates, nearest = floor when upsampling, ceil when
    downsampling. antialias=1 is not supported."""
    x = inputs[0]
    rank = x.dim()
    legacy = node.op_type == "Upsample" or _opset(attrs) < 11
    roi = sizes = None
    if node.op_type == "Upsample" and len(inputs) < 2:
        scales = list(attrs["scales"])
    elif legacy:
        scales = [float(v) for v in inputs[1].reshape(-1).tolist()]
    else:
        roi, scales, sizes = _opt(inputs, 1), _opt(inputs, 2), _opt(inputs, 3)
        roi = roi if roi is not None and roi.numel() else None
        scales = [float(v) for v in scales.reshape(-1).tolist()] if scales is not None and scales.numel() else None
        sizes = _ints(sizes) if sizes is not None and sizes.numel() else None
    mode = attrs.get("mode", "nearest")
    mode = "linear" if mode in ("bilinear", "trilinear") else mode
    if attrs.get("antialias", 0):
        raise NotImplementedError("Resize antialias=1 has no torch lowering")
    if legacy:
        ctm, nearest_mode = "asymmetric", "simple"
    else:
        ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    axes = [_axis(int(a), rank) for a in attrs.get("axes", [])] or list(range(rank))
    in_sizes = [x.shape[a] for a in axes]
    if sizes is not None:
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            out = sizes
            scales = [float(np.float32(o) / np.float32(i)) for o, i in zip(out, in_sizes)]
        else:
            ratios = [np.float32(o) / np.float32(i) for o, i in zip(sizes, in_sizes)]
            r = min(ratios) if policy == "not_larger" else max(ratios)
            scales = [float(r)] * len(axes)
            out = [math.floor(float(np.float32(r) * np.float32(i)) + 0.5) for i in in_sizes]
    else:
        if scales is None:
            raise ValueError(f"Resize node {node.name!r} has neither scales nor sizes")
        out = [int(np.float32(i) * np.float32(s)) for i, s in zip(in_sizes, scales)]
    n = len(axes)
    if roi is not None:
        rv = [float(v) for v in roi.reshape(-1).tolist()]
        if len(rv) == 2 * rank and n != rank:
            rv = [rv[a] for a in axes] + [rv[rank + a] for a in axes]
        starts, ends = rv[:n], rv[n:]
    else:
        starts, ends = [0.0] * n, [1.0] * n
    cubic_a = float(attrs.get("cubic_coeff_a", -0.75))
    excl = bool(attrs.get("exclude_outside", 0))
    extrap = float(attrs.get("extrapolation_value", 0.0))
    for j, a in enumerate(axes):
        identity = (out[j] == in_sizes[j] and scales[j] == 1.0
                    and ctm not in ("tf_half_pixel_for_nearest", "tf_crop_and_resize"))
        if identity:
            continue
        x = _resize_axis(x, a, out[j], scales[j], mode, ctm, nearest_mode, cubic_a, excl, (starts[j], ends[j]),
                         extrap)
    return [x]


# ---- Pad ------------------------------------------------------------------------------------------------------------
def _pad_index(n, b, e, mode):
    idx = torch.arange(-b, n + e)
    if mode == "edge":
        return idx.clamp(0, n - 1)
    if mode == "wrap":
        return idx % n
    if mode == "reflect":
        if n == 1:
            return torch.zeros_like(idx)
        period = 2 * (n - 1)
        idx = idx.abs() % period
        return torch.where(idx >= n, period - idx, idx)
    raise NotImplementedError(f"Pad mode={mode!r} has no torch lowering")


@lower("Pad")
def pad(node, inputs, attrs):
    x = inputs[0]
    rank = x.dim()
    if "pads" in attrs:  # opset < 11
        pads, value, axes = list(attrs["pads"]), float(attrs.get("value", 0.0)), None
    else:
        pads = _ints(inputs[1])
        cv, axes = _opt(inputs, 2), _opt(inputs, 3)
        value = cv.reshape(-1)[0].item() if cv is not None and cv.numel() else 0
        axes = _ints(axes) if axes is not None else None
    axes = [_axis(a, rank) for a in axes] if axes else list(range(rank))
    n = len(axes)
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[n + i]
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        first = next((a for a in range(rank) if begin[a] or end[a]), rank)
        if first == rank:
            return [x]
        return [F.pad(x, _torch_pad(begin[first:], end[first:]), value=value)]
    for a in range(rank):
        if begin[a] or end[a]:
            x = x.index_select(a, _pad_index(x.shape[a], begin[a], end[a], mode).to(x.device))
    return [x]


# ==== shape (operators/shape.py) ===================================================================================
@lower("Reshape")
def reshape(node, inputs, attrs):
    x = inputs[0]
    shape = _ints(inputs[1]) if len(inputs) > 1 else list(attrs["shape"])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


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


# ==== concat (operators/concat.py) =================================================================================
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


def array_feature_extractor(node, inputs, attrs):
    """ai.onnx.ml ArrayFeatureExtractor: X[..., Y] over the last axis with Y flattened; a 1-D X gives shape
    (1, len(Y)), as onnxruntime does."""
    x, idx = inputs[0], inputs[1]
    picked = x.index_select(-1, idx.reshape(-1).to(torch.int64))
    return [picked.unsqueeze(0) if x.dim() == 1 else picked]


ML_LOWERINGS["ArrayFeatureExtractor"] = array_feature_extractor

__all__ = ["DTYPES", "LOWERINGS", "ML_LOWERINGS", "lower", "lowering", "node_attrs", "tensor_from_proto", "torch_dtype",
           "unsupported"]
