"""LSTM, GRU and RNN: the lowerings of the rules in spa/operators/recurrent.py.

A plain loop over time steps, per direction, in ONNX's gate orders (LSTM i, o, f, c; GRU z, r, h), not torch's
(nn.LSTM is i, f, g, o and nn.GRU r, z, n): the weights are used as the file stores them. Follows the spec as
onnxruntime runs it: `clip` bounds every gate's pre-activation, `activation_alpha`/`beta` are consumed in the order
of the activations that take them, `sequence_lens` stops each batch row at its length (Y is 0 past it, Y_h/Y_c
hold the state at the last valid step; the reverse direction starts at the row's last valid step).
"""
from __future__ import annotations

import torch

from ._util import _opt
from .core import ATTRIBUTE_CHECKS, lower

DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# name -> (number of alpha/beta values it consumes, defaults, fn(x, alpha, beta))
ACTIVATIONS = {
    "Sigmoid": (0, (), lambda x, a, b: torch.sigmoid(x)),
    "Tanh": (0, (), lambda x, a, b: torch.tanh(x)),
    "Relu": (0, (), lambda x, a, b: torch.relu(x)),
    "Softsign": (0, (), lambda x, a, b: x / (1 + x.abs())),
    "Softplus": (0, (), lambda x, a, b: torch.nn.functional.softplus(x)),
    "LeakyRelu": (1, (0.01,), lambda x, a, b: torch.nn.functional.leaky_relu(x, a)),
    "HardSigmoid": (2, (0.2, 0.5), lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0)),
}


def unsupported_recurrent(attrs: dict) -> str | None:
    """Why an LSTM/GRU/RNN node cannot run in torch (None when it can): `spa.lowering.unsupported`."""
    bad = [a for a in attrs.get("activations", []) if a not in ACTIVATIONS]
    if bad:
        return f"activation {bad[0]!r} is not supported"
    if attrs.get("input_forget", 0):
        return "input_forget=1 is not supported"
    return None


for _op in DEFAULT_ACTIVATIONS:
    ATTRIBUTE_CHECKS[_op] = unsupported_recurrent


def _activations(op: str, attrs: dict, dirs: int) -> list[list]:
    """Per direction, the activation functions with their alpha/beta bound."""
    names = list(attrs.get("activations", [])) or DEFAULT_ACTIVATIONS[op] * dirs
    alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
    bound = []
    for name in names:
        takes, defaults, fn = ACTIVATIONS[name]
        a = alphas.pop(0) if takes >= 1 and alphas else (defaults[0] if takes >= 1 else None)
        b = betas.pop(0) if takes >= 2 and betas else (defaults[1] if takes >= 2 else None)
        bound.append(lambda x, fn=fn, a=a, b=b: fn(x, a, b))
    per = len(names) // dirs
    return [bound[d * per:(d + 1) * per] for d in range(dirs)]


@lower("LSTM", "GRU", "RNN")
def recurrent(node, inputs, attrs):
    op = node.op_type
    x, w, r = inputs[0], inputs[1], inputs[2]
    b, lens = _opt(inputs, 3), _opt(inputs, 4)
    h0, c0, p = _opt(inputs, 5), _opt(inputs, 6), _opt(inputs, 7)
    layout = int(attrs.get("layout", 0))
    if layout:  # [B, S, I] -> [S, B, I]; states [B, dirs, H] -> [dirs, B, H]
        x = x.transpose(0, 1)
        h0 = h0.transpose(0, 1) if h0 is not None else None
        c0 = c0.transpose(0, 1) if c0 is not None else None
    dirs, hidden = w.shape[0], r.shape[2]
    seq, batch = x.shape[0], x.shape[1]
    direction = attrs.get("direction", "forward")
    clip = attrs.get("clip")
    acts = _activations(op, attrs, dirs)
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        f = acts[d]
        wb, rb = (b[d].chunk(2) if b is not None else (None, None))
        xw = x @ w[d].t()  # [S, B, gates·H]
        if wb is not None and op != "GRU":
            xw = xw + wb + rb
        elif wb is not None:
            xw = xw + wb
        h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
        c = c0[d] if c0 is not None else x.new_zeros(batch, hidden)
        out = [None] * seq
        for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
            if op == "LSTM":
                h_new, c_new = _lstm_step(xw[t], h, c, r[d], p[d] if p is not None else None, f, clip, hidden)
            elif op == "GRU":
                h_new, c_new = _gru_step(xw[t], h, r[d], rb, f, clip, hidden,
                                         int(attrs.get("linear_before_reset", 0))), c
            else:
                h_new, c_new = f[0](_clip(xw[t] + h @ r[d].t(), clip)), c
            if lens is not None:
                valid = (t < lens.to(torch.int64)).to(x.dtype).unsqueeze(1)
                h = valid * h_new + (1 - valid) * h
                c = valid * c_new + (1 - valid) * c
                out[t] = valid * h_new
            else:
                h, c, out[t] = h_new, c_new, h_new
        ys.append(torch.stack(out))  # [S, B, H]
        hs.append(h)
        cs.append(c)
    y = torch.stack(ys, 1)  # [S, dirs, B, H]
    y_h, y_c = torch.stack(hs), torch.stack(cs)  # [dirs, B, H]
    if layout:
        y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
    return [y, y_h, y_c][:len(node.output)] if op == "LSTM" else [y, y_h][:len(node.output)]


def _clip(v, clip):
    return v if clip is None else torch.clamp(v, -clip, clip)


def _lstm_step(xw, h, c, r, p, f, clip, hidden):
    g = xw + h @ r.t()
    i, o, fg, cc = g.split(hidden, dim=1)
    if p is not None:
        pi, po, pf = p.split(hidden)
        i, fg = i + pi * c, fg + pf * c
    i, fg, cc = f[0](_clip(i, clip)), f[0](_clip(fg, clip)), f[1](_clip(cc, clip))
    c_new = fg * c + i * cc
    if p is not None:
        o = o + po * c_new
    o = f[0](_clip(o, clip))
    return o * f[2](c_new), c_new


def _gru_step(xw, h, r, rb, f, clip, hidden, linear_before_reset):
    xz, xr, xh = xw.split(hidden, dim=1)
    rz, rr, rh = r.split(hidden, dim=0)
    bz, br, bh = rb.split(hidden) if rb is not None else (0.0, 0.0, 0.0)
    z = f[0](_clip(xz + h @ rz.t() + bz, clip))
    rg = f[0](_clip(xr + h @ rr.t() + br, clip))
    if linear_before_reset:
        hh = f[1](_clip(xh + rg * (h @ rh.t() + bh), clip))
    else:
        hh = f[1](_clip(xh + (rg * h) @ rh.t() + bh, clip))
    return (1 - z) * hh + z * h
