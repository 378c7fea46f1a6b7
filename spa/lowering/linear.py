"""Gemm, MatMul and Einsum: the lowerings of the rules in spa/operators/linear.py."""
from __future__ import annotations

import torch

from ._util import _opt
from .core import lower


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
