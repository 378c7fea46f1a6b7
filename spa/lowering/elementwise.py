"""Element-wise operators (activations, arithmetic, comparisons, Cast, Clip, Quantize/DequantizeLinear):
the lowerings of the rules in spa/operators/elementwise.py."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._util import _axis, _opset, _opt, _per_axis
from .core import lower, torch_dtype


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
    lower(_op)(_unary(_fn))


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
    lower(_op)(_binary(_fn))


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


lower("Sum")(_variadic(torch.add))
lower("Max")(_variadic(torch.maximum))
lower("Min")(_variadic(torch.minimum))


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
