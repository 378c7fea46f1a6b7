"""Conv and ConvTranspose: the lowerings of the rules in spa/operators/conv.py."""
from __future__ import annotations

import torch.nn.functional as F

from ._util import _CONV, _CONV_T, _opt, _same_pads, _spatial, _torch_pad
from .core import lower


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
