"""Attention operators of opset 23: the lowerings of the rules in spa/operators/attention.py (Attention,
RotaryEmbedding), written from the ONNX reference implementation (onnx/reference/ops/op_attention.py,
op_rotary_embedding.py) as onnxruntime runs it."""
from __future__ import annotations

import math

import torch

from ._util import _opt
from .core import lower


@lower("Attention")
def attention(node, inputs, attrs):
    """Y = softmax(Q·Kᵀ·scale + mask) · V per head, query head i reading KV head i // (q_heads / kv_heads);
    past_key/past_value are prepended along the sequence (present_key/present_value). The scores output
    (qk_matmul_output) is refused up front (`unsupported`): its modes are not settled between opset 23's text
    and the reference implementation, and exporters do not use it."""
    q, k, v = inputs[:3]
    mask, past_k, past_v = _opt(inputs, 3), _opt(inputs, 4), _opt(inputs, 5)
    three_d = q.dim() == 3
    if three_d:
        hq, hkv = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
        b = q.shape[0]
        q = q.reshape(b, q.shape[1], hq, -1).transpose(1, 2)
        k = k.reshape(b, k.shape[1], hkv, -1).transpose(1, 2)
        v = v.reshape(b, v.shape[1], hkv, -1).transpose(1, 2)
    if past_k is not None:
        k = torch.cat([past_k, k], dim=2)
    if past_v is not None:
        v = torch.cat([past_v, v], dim=2)
    present_k, present_v = k, v
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale = attrs.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    sq, skv = q.shape[2], k.shape[2]
    bias = torch.zeros(sq, skv, dtype=q.dtype, device=q.device)
    if mask is not None:
        if mask.shape[-1] < skv:  # a mask shorter than past + new keys is padded with "masked"
            mask = torch.nn.functional.pad(mask, (0, skv - mask.shape[-1]),
                                           value=False if mask.dtype == torch.bool else float("-inf"))
        bias = bias + (torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
                       if mask.dtype == torch.bool else mask.to(q.dtype))
    if int(attrs.get("is_causal", 0)):
        # the query at row i sees the keys up to i + (skv - sq) (the past tokens come first)
        keep = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(skv - sq)
        bias = bias.masked_fill(~keep, float("-inf"))
    scores = (q * math.sqrt(scale)) @ (k * math.sqrt(scale)).transpose(-1, -2)
    softcap = float(attrs.get("softcap", 0.0) or 0.0)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores + bias, dim=-1)
    dead = torch.isneginf(bias.amax(dim=-1, keepdim=True))  # a row with every key masked gives zeros
    if dead.any():
        probs = torch.where(dead, torch.zeros((), dtype=probs.dtype, device=probs.device), probs)
    y = probs @ v
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], sq, -1)
    return [y, present_k, present_v]


@lower("RotaryEmbedding")
def rotary_embedding(node, inputs, attrs):
    x, cos, sin = inputs[:3]
    pos = _opt(inputs, 3)
    four_d = x.dim() == 4
    if four_d:
        x4 = x.transpose(1, 2)  # [batch, seq, heads, head_size]
    else:
        n = int(attrs["num_heads"])
        x4 = x.reshape(x.shape[0], x.shape[1], n, -1)
    rot = int(attrs.get("rotary_embedding_dim", 0) or 0) or x4.shape[-1]
    x_rot, x_pass = x4[..., :rot], x4[..., rot:]
    if pos is not None:
        cos, sin = cos[pos.long()], sin[pos.long()]  # [batch, seq, rot/2]
    cos, sin = cos[..., : rot // 2].unsqueeze(2), sin[..., : rot // 2].unsqueeze(2)
    if int(attrs.get("interleaved", 0)):
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    else:
        x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if int(attrs.get("interleaved", 0)):
        out = torch.stack([r1, r2], dim=-1).flatten(-2)
    else:
        out = torch.cat([r1, r2], dim=-1)
    y = torch.cat([out, x_pass], dim=-1)
    return [y.transpose(1, 2) if four_d else y.reshape(x.shape)]
