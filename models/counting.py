"""Independent analytic MAC/parameter counter (ground truth for the ONNX cost model).

Pure torch forward hooks, no ONNX involved. MACs count only multiply-accumulates of
Conv/ConvTranspose/Linear layers and of attention's activation x activation matmuls;
bias adds, norms, activations, pooling and elementwise ops count zero.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _conv(m, inp, out) -> int:  # every output element sums in_channels/groups * kernel products
    return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _conv_transpose(m, inp, out) -> int:  # every input element scatters into out_channels/groups * kernel
    return inp[0].numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)


def _linear(m, inp, out) -> int:
    return out.numel() * m.in_features


def _attention(m, inp, out) -> int:  # modules that declare their q@k^T and attn@v cost
    return m.matmul_macs(inp[0])


def _rule(m: nn.Module):
    if isinstance(m, nn.ConvTranspose2d):
        return _conv_transpose
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return _conv
    if isinstance(m, nn.Linear):
        return _linear
    if callable(getattr(m, "matmul_macs", None)):
        return _attention
    return None


@torch.no_grad()
def torch_macs_params(model: nn.Module, inputs) -> tuple[int, int]:
    """Return (MACs of one forward pass on `inputs`, number of parameters)."""
    total = 0

    def hook(rule):
        def fn(m, inp, out):
            nonlocal total
            total += int(rule(m, inp, out))
        return fn

    handles = [m.register_forward_hook(hook(r)) for m in model.modules() if (r := _rule(m))]
    try:
        model(*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
    finally:
        for h in handles:
            h.remove()
    return total, sum(p.numel() for p in model.parameters())
