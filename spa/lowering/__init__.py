"""Torch lowerings of the ONNX operators: an eager interpreter's kernels (see spa/torch_graph.py).

Why: gradient-based pruning criteria, layer-by-layer activation capture and fine-tuning need the ONNX graph as
a differentiable torch program, built from the file alone (onnx2torch is not an option: it needs torchvision).

Registry (keyed like the propagation rules of spa.operators, by domain and op type; "" and "ai.onnx" are the
same domain, keyed as ""):

    LOWERINGS[(domain, op_type)] = fn(node, inputs, attrs) -> list[torch.Tensor]

`@lower(op_type, ..., domain="")` registers a function, `lowering(op_type, domain)` looks one up (what
TorchGraph does for every node). A user's own operator is registered through `spa.operators.register(...,
lowering=fn)` (docs/operators.md), which imports this package only when a lowering is given.

`node` is the onnx.NodeProto, `inputs` the input tensors in order (None for a missing optional input), `attrs`
the decoded attributes (`node_attrs`: strings as str, tensors as torch tensors). `attrs` may also carry
`"_opset"`, the model's default-domain opset, which a few operators need (Softmax before 13 flattens to 2-D,
Resize-10/Upsample use the legacy coordinate rules, Clip/Pad/Slice/Split/Squeeze read attributes in old opsets);
without it the newest semantics apply. Every value computation is a torch op, so autograd flows through
whatever is differentiable; constant integer inputs (shapes, pads, starts, axes, scales of Resize) are read
with `.tolist()`.

One module per operator family, mirroring the propagation-rule modules of spa/operators (conv, linear, norm,
elementwise, pool, shape, concat) plus ml (ai.onnx.ml); _util holds the helpers they share. This module holds the
registry and the public helpers (dtypes, attribute decoding, `unsupported`) and imports the family modules, which
register their lowerings.

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
every other domain (com.microsoft, ...) unless a user registers one.

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

from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from spa.operators import canonical_domain

from ._util import LATEST_OPSET

LOWERINGS: dict[tuple[str, str], Callable] = {}


def lower(*op_types: str, domain: str = ""):
    """Decorator: register `fn(node, inputs, attrs) -> list[Tensor]` for the given op types of `domain`
    (default: the ONNX default domain)."""
    d = canonical_domain(domain)

    def add(fn):
        for t in op_types:
            LOWERINGS[(d, t)] = fn
        return fn

    return add


def lowering(op_type: str, domain: str = "") -> Callable | None:
    """The lowering of an op type of a domain, or None (the default domain and ai.onnx.ml have the built-in ones,
    other domains only what a user registered). See also `unsupported`."""
    return LOWERINGS.get((canonical_domain(domain), op_type))


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


from . import concat, conv, elementwise, linear, ml, norm, pool, shape  # noqa: E402,F401  (registration)

__all__ = ["DTYPES", "LATEST_OPSET", "LOWERINGS", "lower", "lowering", "node_attrs", "tensor_from_proto",
           "torch_dtype", "unsupported"]
