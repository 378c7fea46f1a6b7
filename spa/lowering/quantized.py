"""Quantized kernels (QOperator format, dynamic quantization): the lowerings of the rules in
spa/operators/quantized.py.

Integer arithmetic is emulated in float: inputs are dequantized ((q - zero_point) * scale, per channel where the
scale is), the float op runs, and the result is requantized as QuantizeLinear does (round half to even, then
saturate). onnxruntime requantizes an int32 accumulator with a float multiplier, so a value at a rounding tie can
differ by one step; these lowerings serve scoring and reconstruction, while verification runs onnxruntime itself.
ConvInteger/MatMulInteger return their int32 sums (exact while they stay below 2^24 in float32). With gradients
on, integer results stay float tensors of the same values (straight-through rounding), as QuantizeLinear's do.
"""
from __future__ import annotations

import torch

from ._util import _opt, _per_axis
from .conv import conv
from .core import lower
from .elementwise import quantize_linear
from .linear import gemm
from .shape import BATCH_FREE

MS = "com.microsoft"


def _deq(q, scale, zp, axis: int = 1):
    v = q.to(torch.float32) if not q.is_floating_point() else q.float()
    if zp is not None:
        v = v - _per_axis(zp, axis, q.dim()).to(torch.float32)
    return v if scale is None else v * _per_axis(scale, axis, q.dim()).to(torch.float32)


def _q(node, y, scale, zp):
    return quantize_linear(node, [y, scale, zp], {})[0]


def _int32(y):
    """Integer sums as int32; with gradients on, a float tensor of the same integers (straight-through rounding,
    as QuantizeLinear's lowering does), so that data-free synthesis can differentiate through the layer."""
    if y.requires_grad and torch.is_grad_enabled():
        return y + (torch.round(y) - y).detach()
    return torch.round(y).to(torch.int32)


@lower("QLinearConv")
def qlinear_conv(node, inputs, attrs):
    x, xs, xz, w, ws, wz, ys, yz = inputs[:8]
    b = _opt(inputs, 8)
    bias = None if b is None else b.to(torch.float32) * (xs * ws).to(torch.float32).reshape(-1)
    y = conv(node, [_deq(x, xs, xz), _deq(w, ws, wz, 0), bias], attrs)[0]
    return [_q(node, y, ys, yz)]


@lower("ConvInteger")
def conv_integer(node, inputs, attrs):
    x, w, xz, wz = inputs[0], inputs[1], _opt(inputs, 2), _opt(inputs, 3)
    y = conv(node, [_deq(x, None, xz), _deq(w, None, wz, 0)], attrs)[0]
    return [_int32(y)]


@lower("MatMulInteger")
def matmul_integer(node, inputs, attrs):
    a, b, az, bz = inputs[0], inputs[1], _opt(inputs, 2), _opt(inputs, 3)
    y = torch.matmul(_deq(a, None, az, a.dim() - 1), _deq(b, None, bz, b.dim() - 1))
    return [_int32(y)]


@lower("QLinearMatMul")
def qlinear_matmul(node, inputs, attrs):
    a, as_, az, b, bs, bz, ys, yz = inputs[:8]
    y = torch.matmul(_deq(a, as_, az, a.dim() - 1), _deq(b, bs, bz, b.dim() - 1))
    return [_q(node, y, ys, yz)]


@lower("QGemm", domain=MS)
def qgemm(node, inputs, attrs):
    a, as_, az, b, bs, bz = inputs[:6]
    c, ys, yz = _opt(inputs, 6), _opt(inputs, 7), _opt(inputs, 8)
    axis = 0 if attrs.get("transB", 0) else 1
    bias = None if c is None else c.to(torch.float32) * (as_ * bs).to(torch.float32).reshape(-1)
    y = gemm(node, [_deq(a, as_, az), _deq(b, bs, bz, axis), bias], {**attrs, "beta": 1.0})[0]
    return [y if ys is None else _q(node, y, ys, yz)]


@lower("QLinearAdd", "QLinearMul", domain=MS)
def qlinear_binary(node, inputs, attrs):
    a, as_, az, b, bs, bz, cs, cz = inputs[:8]
    fa, fb = _deq(a, as_, az), _deq(b, bs, bz)
    return [_q(node, fa + fb if node.op_type == "QLinearAdd" else fa * fb, cs, cz)]


@lower("QLinearGlobalAveragePool", domain=MS)
def qlinear_global_average_pool(node, inputs, attrs):
    x, xs, xz, ys, yz = inputs[:5]
    f = _deq(x, xs, xz)
    dims = tuple(range(1, f.dim() - 1)) if attrs.get("channels_last", 0) else tuple(range(2, f.dim()))
    return [_q(node, f.mean(dim=dims, keepdim=True), ys, yz)]


@lower("QLinearSigmoid", "QLinearLeakyRelu", domain=MS)
def qlinear_activation(node, inputs, attrs):
    x, xs, xz, ys, yz = inputs[:5]
    f = _deq(x, xs, xz)
    y = torch.sigmoid(f) if node.op_type == "QLinearSigmoid" else \
        torch.nn.functional.leaky_relu(f, float(attrs.get("alpha", 0.01)))
    return [_q(node, y, ys, yz)]


@lower("DynamicQuantizeLinear")
def dynamic_quantize_linear(node, inputs, attrs):
    """uint8 with the tensor's range widened to include 0: scale = (max - min) / 255, zero point
    round(-min / scale) saturated (the ONNX definition). In a TorchGraph(batch_free=True) of a model exported at
    batch 1, each sample of a batch gets its own range (scale and zero point of shape [N, 1, ...]): what each
    would get run alone, as the model runs at its batch of 1, so that the data passes can run it batched (a
    dynamically quantized ResNet-18 ran its data passes one sample at a time, 10x slower)."""
    x = inputs[0].float()
    if attrs.get(BATCH_FREE) and x.dim() >= 2 and x.shape[0] > 1:
        dims = tuple(range(1, x.dim()))
        lo = torch.clamp(x.amin(dims, keepdim=True).detach(), max=0.0)
        hi = torch.clamp(x.amax(dims, keepdim=True).detach(), min=0.0)
    else:
        lo = torch.clamp(x.min().detach(), max=0.0)
        hi = torch.clamp(x.max().detach(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / scale), 0, 255).to(torch.uint8)
    return [_q(node, x, scale, zp), scale, zp]
