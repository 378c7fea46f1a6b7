"""Quantized operators (QOperator format and dynamic quantization): QLinearConv, ConvInteger, QLinearMatMul,
MatMulInteger, QGemm (com.microsoft), their activation (re)quantizers and the com.microsoft element-wise kernels
onnxruntime's quantizer emits.

The weight ops follow their float rules (conv.py, linear.py) at their own input slots: a weight's integers are
cut like a float weight, and spa.labels.Context.slice_param cuts the per-channel scale and zero point with them
(spa.quant knows which input holds which); the int32 bias is a member. Activation scales and zero points are
per tensor (onnxruntime's quantizer writes them so); a per-channel one on an activation freezes. Scoring reads the
dequantized weights (spa.quant.value); ConvInteger/MatMulInteger apply their scale after the op, so their
weights are read as q - zero_point (exact up to that per-tensor factor).

Not covered (frozen by the analysis with "no propagation rule"): QLinearConcat, QLinearAveragePool, QAttention, MatMulNBits,
DynamicQuantizeMatMul, DynamicQuantizeLSTM. An activation x activation QLinearMatMul/MatMulInteger freezes:
its reference mask would have to act on integers.
"""
from __future__ import annotations

from spa.labels import MaskSink, passthrough

from ._util import prod
from .conv import conv
from .elementwise import broadcast
from .linear import _weight_right, gemm
from .registry import rule

MS = "com.microsoft"


def _per_tensor(ctx, node, slots, why="per-channel activation quantization") -> bool:
    """Whether the activation scales/zero points at `slots` are one value each; else the inputs freeze."""
    for i in slots:
        name = node.input[i] if i < len(node.input) else ""
        if not name:
            continue
        shape = ctx.shape(name)   # run-time ones too: DynamicQuantizeLinear's scale and zero point are scalars
        if shape is None or prod(shape) > 1:
            ctx.freeze_inputs(node, why if shape is not None else "quantization scale of unknown shape")
            return False
    return True


@rule("QLinearConv")
def qlinear_conv(ctx, node):
    """x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B (int32)."""
    if _per_tensor(ctx, node, (1, 2, 6, 7)):
        conv(ctx, node, w_slot=3, b_slot=8)


@rule("ConvInteger")
def conv_integer(ctx, node):
    """x, w, x_zp, w_zp: the int32 output carries the convolution's channels (scale and bias follow as Mul/Add)."""
    if _per_tensor(ctx, node, (2,)):
        conv(ctx, node, w_slot=1, b_slot=None)


@rule("QGemm", domain=MS)
def qgemm(ctx, node):
    """A, a_scale, a_zp, B, b_scale, b_zp, C (int32), y_scale, y_zp (absent: float output)."""
    if _per_tensor(ctx, node, (1, 2, 7, 8)):
        gemm(ctx, node, b_slot=3, c_slot=6)


def _matmul_weight_right(ctx, node, slot: int, scales) -> None:
    sa, sy = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    w = ctx.const(node.input[slot])
    if ctx.const(node.input[0]) is not None or w is None or w.ndim != 2 or sa is None or sy is None or len(sa) < 2:
        ctx.freeze_inputs(node, f"{node.op_type} without a constant 2-D right-hand weight")
        return
    if _per_tensor(ctx, node, scales):
        _weight_right(ctx, node, ctx.inp(node, 0), len(sa), len(sy), prod(sy) * sa[-1], slot=slot)


@rule("QLinearMatMul")
def qlinear_matmul(ctx, node):
    """a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp."""
    _matmul_weight_right(ctx, node, 3, (1, 2, 6, 7))


@rule("MatMulInteger")
def matmul_integer(ctx, node):
    """A, B, a_zp, b_zp."""
    _matmul_weight_right(ctx, node, 1, (2,))


@rule("DynamicQuantizeLinear")
def dynamic_quantize(ctx, node):
    """One scale and zero point for the whole tensor (outputs 1, 2): channels pass through to output 0. The scale
    comes from the tensor's range (which always includes 0): the verification reference zeroes the removed
    channels here (a mask sink), so that its range is the pruned model's."""
    x = ctx.inp(node, 0)
    if x is not None:
        ctx.mask_sinks.append(MaskSink(node, 0, x.axis, x.atoms))
    passthrough(ctx, node)


@rule("QLinearAdd", "QLinearMul", domain=MS)
def qlinear_binary(ctx, node):
    """A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp: the float Add/Mul rule over the per-tensor scales."""
    if _per_tensor(ctx, node, (1, 2, 4, 5, 6, 7)):
        broadcast(ctx, node)


@rule("QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", domain=MS)
def qlinear_channelwise(ctx, node):
    """Per-channel (pooling) or element-wise on the integers of input 0, per-tensor scales."""
    if _per_tensor(ctx, node, range(1, len(node.input))):
        passthrough(ctx, node)
