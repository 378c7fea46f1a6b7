"""The torch lowering's registry access and the helpers every family module shares (dtypes, attributes,
what is not supported)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from spa.ir import tensor_value
from spa.operators.registry import LOWERINGS, USER_LOWERINGS, canonical_domain

from ._util import LATEST_OPSET  # noqa: F401  (re-exported by the package)


def lower(*op_types: str, domain: str = ""):
    """Decorator: register `fn(node, inputs, attrs) -> list[Tensor]` for the given op types of `domain`
    (default: the ONNX default domain)."""
    d = canonical_domain(domain)

    def add(fn):
        for t in op_types:
            if (d, t) not in USER_LOWERINGS:  # a user's registration wins over the built-in
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
    arr = np.array(tensor_value(t))  # writable copy (0-d stays 0-d); mapped external data too
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


# op type -> fn(attrs) -> reason or None: the checks a family module keeps beside its lowering
ATTRIBUTE_CHECKS: dict[str, Callable] = {}


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
    elif op == "Attention" and len(node.output) > 3 and node.output[3]:
        return "the qk_matmul_output output is not supported"
    elif op == "Constant" and not ({"value", "value_float", "value_floats", "value_int", "value_ints"} & set(attrs)):
        return "only numeric tensor values are supported"
    elif op in ATTRIBUTE_CHECKS:
        return ATTRIBUTE_CHECKS[op](attrs)
    return None
