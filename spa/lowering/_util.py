"""Small helpers shared by the lowerings (the counterpart of spa/operators/_util.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LATEST_OPSET = 21


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

