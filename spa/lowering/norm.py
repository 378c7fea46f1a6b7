"""Normalizations: the lowerings of the rules in spa/operators/norm.py."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._util import _axis, _opt
from .core import lower


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


@lower("RMSNormalization")
def rms_norm(node, inputs, attrs):
    """y = x / sqrt(mean(x^2 over the axes from `axis` on) + epsilon) * scale, computed in float32 (stash_type 1)."""
    x, scale = inputs[:2]
    axis = _axis(int(attrs.get("axis", -1)), x.dim())
    dims = tuple(range(axis, x.dim()))
    xf = x.float()
    y = xf * torch.rsqrt((xf * xf).mean(dims, keepdim=True) + float(attrs.get("epsilon", 1e-5)))
    return [(y * scale.float()).to(x.dtype)]


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
