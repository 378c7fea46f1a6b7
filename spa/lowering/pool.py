"""Pooling, reductions, ArgMax/ArgMin, Softmax, CumSum, TopK, Resize/Upsample and Pad: the lowerings of the
rules in spa/operators/pool.py."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from ._util import _AVGPOOL, _CONV, _MAXPOOL, _axis, _ints, _opset, _opt, _prod, _same_pads, _spatial, _torch_pad
from .core import lower


def _pool_geometry(attrs, in_spatial):
    """Kernel, strides, dilations, begin padding, the (possibly negative) padding to add after the input so
    that a padding-free floor-mode pool yields exactly the ONNX output, and the explicit end pads."""
    k = list(attrs["kernel_shape"])
    n = len(k)
    s = list(attrs.get("strides") or [1] * n)
    d = list(attrs.get("dilations") or [1] * n)
    k_eff = [(k[i] - 1) * d[i] + 1 for i in range(n)]
    auto = attrs.get("auto_pad", "NOTSET")
    ceil_mode = int(attrs.get("ceil_mode", 0))
    begin, end, out = [], [], []
    for i in range(n):
        size = in_spatial[i]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            b, e = _same_pads(auto, size, k_eff[i], s[i])
        elif auto == "VALID":
            b, e = 0, 0
        else:
            pads = list(attrs.get("pads") or [0] * (2 * n))
            b, e = pads[i], pads[n + i]
        span = size + b + e - k_eff[i]
        if ceil_mode:
            o = -(-span // s[i]) + 1
            if (o - 1) * s[i] >= size + b:  # a window may not start in the right padding
                o -= 1
        else:
            o = span // s[i] + 1
        begin.append(b)
        end.append(e)
        out.append(o)
    right = [(out[i] - 1) * s[i] + k_eff[i] - in_spatial[i] - begin[i] for i in range(n)]
    return k, s, d, k_eff, begin, end, right, ceil_mode


def _torch_pool_ok(k, begin, end):
    """torch's own padding (symmetric, at most half the kernel) reproduces the ONNX windows, also in ceil
    mode (torch drops a last window that would start in the right padding, as ONNX does)."""
    return begin == end and all(2 * b <= kk for b, kk in zip(begin, k))


@lower("MaxPool")
def max_pool(node, inputs, attrs):
    x = inputs[0]
    if not x.is_floating_point() and x.element_size() <= 2:
        # quantized activations: torch's integer max pooling fails on large batches; 8/16-bit values are exact
        # in float32
        outs = max_pool(node, [x.float(), *inputs[1:]], attrs)
        return [outs[0].to(x.dtype), *outs[1:]]
    n = x.dim() - 2
    in_sp = list(x.shape[2:])
    k, s, d, _, begin, end, right, ceil_mode = _pool_geometry(attrs, in_sp)
    fn = _spatial(_MAXPOOL, n, "MaxPool")
    want_idx = len(node.output) > 1 and bool(node.output[1])
    if _torch_pool_ok(k, begin, end):
        res = fn(x, k, s, begin, d, ceil_mode=bool(ceil_mode), return_indices=want_idx)
        padded, offset = in_sp, [0] * n
    else:
        low = -math.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
        xp = F.pad(x, _torch_pad(begin, right), value=low)
        res = fn(xp, k, s, 0, d, ceil_mode=False, return_indices=want_idx)
        padded, offset = list(xp.shape[2:]), begin
    if not want_idx:
        return [res]
    y, idx = res
    # torch: flat index into the (padded) spatial plane; ONNX: flat index into the whole (N, C, spatial) input
    coords, rest = [], idx
    for size in reversed(padded):
        coords.append(rest % size)
        rest = rest // size
    coords = [c - o for c, o in zip(reversed(coords), offset)]
    flat = torch.zeros_like(idx)
    if int(attrs.get("storage_order", 0)):
        stride = 1
        for i in range(n):
            flat = flat + coords[i] * stride
            stride *= in_sp[i]
    else:
        for i in range(n):
            flat = flat * in_sp[i] + coords[i]
    plane = _prod(in_sp)
    nc = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape([x.shape[0], x.shape[1]] + [1] * n)
    return [y, flat + nc * plane]


def _window_sum(x, k, s, d, begin, right, value=0.0):
    """Sum over pooling windows of x padded by (begin, right), as a depthwise convolution with a ones kernel."""
    n = x.dim() - 2
    c = x.shape[1]
    xp = F.pad(x, _torch_pad(begin, right), value=value)
    w = torch.ones([c, 1] + list(k), dtype=x.dtype, device=x.device)
    return _spatial(_CONV, n, "pooling")(xp, w, None, s, 0, d, c)


@lower("AveragePool")
def average_pool(node, inputs, attrs):
    x = inputs[0]
    n = x.dim() - 2
    in_sp = list(x.shape[2:])
    k, s, d, _, begin, end, right, ceil_mode = _pool_geometry(attrs, in_sp)
    include = bool(attrs.get("count_include_pad", 0))
    if not ceil_mode and all(v == 1 for v in d) and _torch_pool_ok(k, begin, end):
        return [_spatial(_AVGPOOL, n, "AveragePool")(x, k, s, begin, False, include)]
    total = _window_sum(x, k, s, d, begin, right)
    ones = torch.ones([1, 1] + in_sp, dtype=x.dtype, device=x.device)
    if include:  # explicit pads count, the ceil-mode overhang past them does not
        ones = F.pad(ones, _torch_pad(begin, end), value=1.0)
        count = _window_sum(ones, k, s, d, [0] * n, [r - e for r, e in zip(right, end)])
    else:
        count = _window_sum(ones, k, s, d, begin, right)
    return [total / count]


@lower("LpPool")
def lp_pool(node, inputs, attrs):
    x = inputs[0]
    p = float(attrs.get("p", 2))
    k, s, d, _, begin, _, right, _ = _pool_geometry(attrs, list(x.shape[2:]))
    return [_window_sum(x.abs() ** p, k, s, d, begin, right) ** (1.0 / p)]


@lower("GlobalAveragePool")
def global_average_pool(node, inputs, attrs):
    x = inputs[0]
    return [x.mean(tuple(range(2, x.dim())), keepdim=True)]


@lower("GlobalMaxPool")
def global_max_pool(node, inputs, attrs):
    x = inputs[0]
    return [x.amax(tuple(range(2, x.dim())), keepdim=True)]


@lower("GlobalLpPool")
def global_lp_pool(node, inputs, attrs):
    x = inputs[0]
    return [torch.linalg.vector_norm(x, ord=float(attrs.get("p", 2)), dim=tuple(range(2, x.dim())), keepdim=True)]


def _reduce_axes(inputs, attrs, rank):
    """Reduction axes (attribute in old opsets, input from 13/18), None for "no reduction"."""
    axes = attrs.get("axes")
    if axes is None and _opt(inputs, 1) is not None:
        axes = _ints(inputs[1])
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return None
        return tuple(range(rank))
    return tuple(sorted({_axis(int(a), rank) for a in axes}))


def _reducer(pre, red, post=None, noop=None):
    """A reduction: post(red(pre(x), axes, keepdims)). With no axes and noop_with_empty_axes the element-wise
    part still applies, as in onnxruntime (ReduceL2 -> |x|, ReduceSumSquare -> x*x, ReduceLogSum -> log x)."""
    def fn(node, inputs, attrs):
        x = inputs[0]
        axes = _reduce_axes(inputs, attrs, x.dim())
        if axes is None or x.dim() == 0:
            return [noop(x) if noop else x]
        v = pre(x) if pre else x
        y = red(v, axes, bool(attrs.get("keepdims", 1)))
        return [post(y) if post else y]

    return fn


def _prod_reduce(v, axes, keep):
    for a in sorted(axes, reverse=True):
        v = v.prod(a, keepdim=True)
    return v if keep else v.squeeze(axes)


def _sum(v, a, k):
    return v.sum(a, keepdim=k)


for _op, _fn in {
    "ReduceMean": _reducer(None, lambda v, a, k: v.mean(a, keepdim=k)),
    "ReduceSum": _reducer(None, _sum),
    "ReduceMax": _reducer(None, lambda v, a, k: v.amax(a, keepdim=k)),
    "ReduceMin": _reducer(None, lambda v, a, k: v.amin(a, keepdim=k)),
    "ReduceProd": _reducer(None, _prod_reduce),
    "ReduceL1": _reducer(torch.abs, _sum, None, torch.abs),
    "ReduceL2": _reducer(lambda v: v * v, _sum, torch.sqrt, torch.abs),
    "ReduceLogSum": _reducer(None, _sum, torch.log, torch.log),
    "ReduceLogSumExp": _reducer(None, lambda v, a, k: torch.logsumexp(v, a, keepdim=k)),
    "ReduceSumSquare": _reducer(lambda v: v * v, _sum, None, lambda v: v * v),
}.items():
    lower(_op)(_fn)


@lower("ArgMax", "ArgMin")
def arg_max_min(node, inputs, attrs):
    x = inputs[0]
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    keep = bool(attrs.get("keepdims", 1))
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    if attrs.get("select_last_index", 0):
        i = fn(x.flip(axis), dim=axis, keepdim=keep)
        return [x.shape[axis] - 1 - i]
    return [fn(x, dim=axis, keepdim=keep)]


def _hardmax(x, dim):
    idx = x.argmax(dim, keepdim=True)
    return torch.zeros_like(x).scatter(dim, idx, 1.0)


_SOFTMAX = {"Softmax": lambda x, d: torch.softmax(x, d), "LogSoftmax": lambda x, d: torch.log_softmax(x, d),
            "Hardmax": _hardmax}


@lower("Softmax", "LogSoftmax", "Hardmax")
def softmax(node, inputs, attrs):
    """Opset >= 13: along `axis` (default -1). Before 13: the input is coerced to 2-D
    [prod(shape[:axis]), prod(shape[axis:])] (default axis 1) and normalised over the second dimension."""
    x = inputs[0]
    fn = _SOFTMAX[node.op_type]
    if _opset(attrs) >= 13:
        return [fn(x, _axis(int(attrs.get("axis", -1)), x.dim()))]
    axis = _axis(int(attrs.get("axis", 1)), x.dim())
    shape = x.shape
    y = fn(x.reshape(_prod(shape[:axis]), _prod(shape[axis:])), 1)
    return [y.reshape(shape)]


@lower("CumSum")
def cumsum(node, inputs, attrs):
    x = inputs[0]
    axis = _axis(_ints(inputs[1])[0], x.dim())
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    y = x.cumsum(axis, dtype=x.dtype)
    if attrs.get("exclusive", 0):
        y = torch.cat([torch.zeros_like(x.narrow(axis, 0, 1)), y.narrow(axis, 0, x.shape[axis] - 1)], axis)
    if attrs.get("reverse", 0):
        y = y.flip(axis)
    return [y]


@lower("TopK")
def topk(node, inputs, attrs):
    x = inputs[0]
    k = _ints(inputs[1])[0] if len(inputs) > 1 else int(attrs["k"])  # opset 1-9: attribute
    axis = _axis(int(attrs.get("axis", -1)), x.dim())
    values, indices = torch.topk(x, k, dim=axis, largest=bool(attrs.get("largest", 1)), sorted=True)
    return [values, indices]


# ---- Resize ---------------------------------------------------------------------------------------------------------
def _source_coords(ctm, n_in, n_out, scale, roi_start, roi_end):
    """x_original for every output position (float32, onnxruntime's formulas and evaluation order)."""
    f32 = torch.float32
    xr = torch.arange(n_out, dtype=f32)
    s = torch.tensor(scale, dtype=f32)
    if ctm == "half_pixel":
        return (xr + 0.5) / s - 0.5
    if ctm == "half_pixel_symmetric":
        adj = torch.tensor(float(n_out), dtype=f32) / (s * n_in)
        center = torch.tensor(n_in / 2.0, dtype=f32)
        return center * (1 - adj) + (xr + 0.5) / s - 0.5
    if ctm == "pytorch_half_pixel":
        return (xr + 0.5) / s - 0.5 if n_out > 1 else torch.zeros(n_out, dtype=f32)
    if ctm == "align_corners":
        return xr * (n_in - 1) / (n_out - 1) if n_out > 1 else torch.zeros(n_out, dtype=f32)
    if ctm == "asymmetric":
        return xr / s
    if ctm == "tf_half_pixel_for_nearest":
        return (xr + 0.5) / s
    if ctm == "tf_crop_and_resize":
        start, end = torch.tensor(roi_start, dtype=f32), torch.tensor(roi_end, dtype=f32)
        if n_out > 1:
            return start * (n_in - 1) + xr * (end - start) * (n_in - 1) / (n_out - 1)
        return torch.full((n_out,), 0.5, dtype=f32) * (start + end) * (n_in - 1)
    raise NotImplementedError(f"Resize coordinate_transformation_mode={ctm!r} has no torch lowering")


def _nearest_index(xo, mode, downsampling):
    if mode == "round_prefer_floor":
        return torch.ceil(xo - 0.5)
    if mode == "round_prefer_ceil":
        return torch.floor(xo + 0.5)
    if mode == "floor":
        return torch.floor(xo)
    if mode == "ceil":
        return torch.ceil(xo)
    if mode == "simple":  # onnxruntime's rule for Resize-10 and Upsample
        return torch.ceil(xo) if downsampling else torch.trunc(xo)
    raise NotImplementedError(f"Resize nearest_mode={mode!r} has no torch lowering")


def _cubic_coeffs(t, a):
    """Keys cubic weights of the 4 neighbours floor(x)-1 .. floor(x)+2 for fractional offsets t."""
    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_axis(x, axis, n_out, scale, mode, ctm, nearest_mode, cubic_a, exclude_outside, roi, extrapolation):
    n_in = x.shape[axis]
    xo = _source_coords(ctm, n_in, n_out, scale, *roi)
    view = [1] * x.dim()
    view[axis] = n_out
    dev = x.device
    outside = None
    if ctm == "tf_crop_and_resize":
        outside = (xo < 0) | (xo > n_in - 1)
    if mode == "nearest":
        idx = _nearest_index(xo, nearest_mode, scale < 1).clamp(0, n_in - 1).to(torch.int64)
        y = x.index_select(axis, idx.to(dev))
    elif mode == "linear":
        xc = xo.clamp(0, n_in - 1)
        i0 = torch.floor(xc).to(torch.int64).clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        w1 = (xc - i0).to(x.dtype).to(dev).reshape(view)
        y = x.index_select(axis, i0.to(dev)) * (1 - w1) + x.index_select(axis, i1.to(dev)) * w1
    elif mode == "cubic":
        base = torch.floor(xo)
        coeffs = _cubic_coeffs(xo - base, cubic_a)
        base = base.to(torch.int64)
        idxs = [base - 1 + j for j in range(4)]
        if exclude_outside:
            coeffs = [torch.where((i < 0) | (i > n_in - 1), torch.zeros_like(c), c) for c, i in zip(coeffs, idxs)]
            total = functools.reduce(torch.add, coeffs)
            coeffs = [c / total for c in coeffs]
        y = None
        for c, i in zip(coeffs, idxs):
            term = x.index_select(axis, i.clamp(0, n_in - 1).to(dev)) * c.to(x.dtype).to(dev).reshape(view)
            y = term if y is None else y + term
    else:
        raise NotImplementedError(f"Resize mode={mode!r} has no torch lowering")
    if outside is not None and bool(outside.any()):
        y = torch.where(outside.to(dev).reshape(view), torch.full_like(y, extrapolation), y)
    return y


@lower("Resize", "Upsample")
def resize(node, inputs, attrs):
    """Separable resampling along each resized axis with onnxruntime's coordinate arithmetic (float32):
    nearest (round_prefer_floor/ceil, floor, ceil), linear (x_original clamped to the input, like
    onnxruntime), cubic (Keys with cubic_coeff_a; exclude_outside). Resize-10 and Upsample use
    onnxruntime's legacy rules: asymmetric coordinates, nearest = floor when upsampling, ceil when
    downsampling. antialias=1 is not supported."""
    x = inputs[0]
    rank = x.dim()
    legacy = node.op_type == "Upsample" or _opset(attrs) < 11
    roi = sizes = None
    if node.op_type == "Upsample" and len(inputs) < 2:
        scales = list(attrs["scales"])
    elif legacy:
        scales = [float(v) for v in inputs[1].reshape(-1).tolist()]
    else:
        roi, scales, sizes = _opt(inputs, 1), _opt(inputs, 2), _opt(inputs, 3)
        roi = roi if roi is not None and roi.numel() else None
        scales = [float(v) for v in scales.reshape(-1).tolist()] if scales is not None and scales.numel() else None
        sizes = _ints(sizes) if sizes is not None and sizes.numel() else None
    mode = attrs.get("mode", "nearest")
    mode = "linear" if mode in ("bilinear", "trilinear") else mode
    if attrs.get("antialias", 0):
        raise NotImplementedError("Resize antialias=1 has no torch lowering")
    if legacy:
        ctm, nearest_mode = "asymmetric", "simple"
    else:
        ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    axes = [_axis(int(a), rank) for a in attrs.get("axes", [])] or list(range(rank))
    in_sizes = [x.shape[a] for a in axes]
    if sizes is not None:
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            out = sizes
            scales = [float(np.float32(o) / np.float32(i)) for o, i in zip(out, in_sizes)]
        else:
            ratios = [np.float32(o) / np.float32(i) for o, i in zip(sizes, in_sizes)]
            r = min(ratios) if policy == "not_larger" else max(ratios)
            scales = [float(r)] * len(axes)
            out = [math.floor(float(np.float32(r) * np.float32(i)) + 0.5) for i in in_sizes]
    else:
        if scales is None:
            raise ValueError(f"Resize node {node.name!r} has neither scales nor sizes")
        out = [int(np.float32(i) * np.float32(s)) for i, s in zip(in_sizes, scales)]
    n = len(axes)
    if roi is not None:
        rv = [float(v) for v in roi.reshape(-1).tolist()]
        if len(rv) == 2 * rank and n != rank:
            rv = [rv[a] for a in axes] + [rv[rank + a] for a in axes]
        starts, ends = rv[:n], rv[n:]
    else:
        starts, ends = [0.0] * n, [1.0] * n
    cubic_a = float(attrs.get("cubic_coeff_a", -0.75))
    excl = bool(attrs.get("exclude_outside", 0))
    extrap = float(attrs.get("extrapolation_value", 0.0))
    for j, a in enumerate(axes):
        identity = (out[j] == in_sizes[j] and scales[j] == 1.0
                    and ctm not in ("tf_half_pixel_for_nearest", "tf_crop_and_resize"))
        if identity:
            continue
        x = _resize_axis(x, a, out[j], scales[j], mode, ctm, nearest_mode, cubic_a, excl, (starts[j], ends[j]),
                         extrap)
    return [x]


# ---- Pad ------------------------------------------------------------------------------------------------------------
def _pad_index(n, b, e, mode):
    idx = torch.arange(-b, n + e)
    if mode == "edge":
        return idx.clamp(0, n - 1)
    if mode == "wrap":
        return idx % n
    if mode == "reflect":
        if n == 1:
            return torch.zeros_like(idx)
        period = 2 * (n - 1)
        idx = idx.abs() % period
        return torch.where(idx >= n, period - idx, idx)
    raise NotImplementedError(f"Pad mode={mode!r} has no torch lowering")


@lower("Pad")
def pad(node, inputs, attrs):
    x = inputs[0]
    rank = x.dim()
    if "pads" in attrs:  # opset < 11
        pads, value, axes = list(attrs["pads"]), float(attrs.get("value", 0.0)), None
    else:
        pads = _ints(inputs[1])
        cv, axes = _opt(inputs, 2), _opt(inputs, 3)
        value = cv.reshape(-1)[0].item() if cv is not None and cv.numel() else 0
        axes = _ints(axes) if axes is not None else None
    axes = [_axis(a, rank) for a in axes] if axes else list(range(rank))
    n = len(axes)
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[n + i]
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        first = next((a for a in range(rank) if begin[a] or end[a]), rank)
        if first == rank:
            return [x]
        return [F.pad(x, _torch_pad(begin[first:], end[first:]), value=value)]
    for a in range(rank):
        if begin[a] or end[a]:
            x = x.index_select(a, _pad_index(x.shape[a], begin[a], end[a], mode).to(x.device))
    return [x]
