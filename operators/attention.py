"""Attention operators of opset 23: Attention (scaled dot-product attention, multi-head and grouped-query) and
RotaryEmbedding. RMSNormalization is in norm.py, with LayerNormalization.

The removable unit is a head: query head i attends with KV head i // (q_heads / kv_heads), so one KV head and
the query heads sharing it go together (for multi-head attention, one head of each of Q, K and V). Head sizes
are never cut through these ops: the default scale is 1/sqrt(head_size), and the rotary rotation pairs
positions within a head. Inputs come 4-D, [batch, heads, seq, head_size] (heads on axis 1), or 3-D,
[batch, seq, heads * head_size] with the head counts in q_num_heads / kv_num_heads (num_heads for
RotaryEmbedding), which Apply rewrites.
"""
from __future__ import annotations

import numpy as np

from spa.ir import attr, set_attr
from spa.labels import Labels

from ._util import none_labels
from .registry import rule

WHOLE_HEADS = "channels on a sequence or head-size axis (the op needs whole heads)"


def _head_atoms(ctx, node, i: int, rank: int, heads: int, width: int) -> np.ndarray | None:
    """One atom per head of input i (positions of a head unified on 3-D inputs), or None when unlabelled."""
    lab = ctx.inp(node, i)
    if lab is None:
        return None
    if rank == 4:
        if lab.axis != 1:
            ctx.freeze(lab, node, f"{node.op_type}: {WHOLE_HEADS}")
            return None
        return lab.atoms
    if lab.axis != 2 or len(lab.atoms) != heads * width:
        ctx.freeze(lab, node, f"{node.op_type}: {WHOLE_HEADS}")
        return None
    rows = lab.atoms.reshape(heads, width)
    partial = (rows < 0).any(axis=1)
    ctx.freeze(rows[partial].ravel(), node, f"{node.op_type}: a head carries unprunable positions")
    for r in rows[~partial]:
        ctx.uf.union_all(r)
    return np.where(partial, -1, rows[:, 0])


def _rewrite_count(ctx, node, name: str, atoms: np.ndarray) -> None:
    if attr(node, name) is not None:
        ctx.edit(lambda ap, node=node, name=name, atoms=atoms: set_attr(node, name, ap.kept(atoms)))


@rule("Attention")
def attention(ctx, node):
    sq, sk, sv = (ctx.shape(node.input[i]) for i in range(3))
    if sq is None or sk is None or sv is None or len(sq) not in (3, 4) or len(sk) != len(sq):
        ctx.freeze_inputs(node, "Attention with unknown or unsupported input shapes")
        return
    rank = len(sq)
    if rank == 4:
        hq, hkv, hs, vhs, seq_q, seq_kv = sq[1], sk[1], sq[3], sv[3], sq[2], sk[2]
    else:
        hq, hkv = int(attr(node, "q_num_heads", 0) or 0), int(attr(node, "kv_num_heads", 0) or 0)
        if not hq or not hkv or sq[2] % hq or sk[2] % hkv or sv[2] % hkv:
            ctx.freeze_inputs(node, "3-D Attention without head counts that divide its hidden sizes")
            return
        hs, vhs, seq_q, seq_kv = sq[2] // hq, sv[2] // hkv, sq[1], sk[1]
    if hkv == 0 or hq % hkv:
        ctx.freeze_inputs(node, "Attention whose query heads are not a multiple of its KV heads")
        return
    q = _head_atoms(ctx, node, 0, rank, hq, hs)
    k = _head_atoms(ctx, node, 1, rank, hkv, hs)
    v = _head_atoms(ctx, node, 2, rank, hkv, vhs)
    none_q, none_kv = none_labels(hq), none_labels(hkv)
    kv = ctx.unify(none_kv if k is None else k, none_kv if v is None else v, node,
                   "Attention: the key or value side of a KV head carries no channel labels")
    past = 0
    for i in (4, 5):  # past_key / past_value: [batch, kv_heads, past_seq, head_size]
        if i >= len(node.input) or not node.input[i]:
            continue
        sp, lab = ctx.shape(node.input[i]), ctx.inp(node, i)
        past = sp[2] if sp is not None and len(sp) == 4 else past
        if lab is not None and lab.axis == 1:
            kv = ctx.unify(kv, lab.atoms, node)
        elif lab is not None:
            ctx.freeze(lab, node, f"Attention: {WHOLE_HEADS}")
            kv = ctx.unify(kv, none_kv, node, "Attention: past key/value heads carry no channel labels")
        elif ctx.g.is_const(node.input[i]):
            ctx.slice_param(node, i, 1, kv, "member")
        else:
            kv = ctx.unify(kv, none_kv, node, "Attention: past key/value heads come from a run-time tensor")
    heads = ctx.unify(none_q if q is None else q, np.repeat(kv, hq // hkv), node,
                      "Attention: a query head and its KV head must go together")
    if len(node.input) > 3 and node.input[3]:
        heads = _mask(ctx, node, heads, hq)
    if rank == 4:
        ctx.out(node, 0, Labels(1, heads))
    else:
        ctx.out(node, 0, Labels(2, np.repeat(heads, vhs)))
        _rewrite_count(ctx, node, "q_num_heads", heads)
        _rewrite_count(ctx, node, "kv_num_heads", kv)
    for o in (1, 2):  # present_key / present_value
        ctx.out(node, o, Labels(1, kv))
    ctx.out(node, 3, Labels(1, heads))  # qk_matmul_output: [batch, q_heads, seq_q, seq_kv]
    ctx.cost(node, sq[0] * hq * seq_q * (seq_kv + past) * (hs + vhs), [heads])


def _mask(ctx, node, heads: np.ndarray, hq: int) -> np.ndarray:
    """attn_mask broadcasts to [batch, q_heads, seq_q, seq_kv]: a per-head mask is cut with the heads."""
    sm, lab = ctx.shape(node.input[3]), ctx.inp(node, 3)
    axis = len(sm) - 3 if sm is not None and len(sm) >= 3 and sm[len(sm) - 3] == hq and hq > 1 else None
    if lab is not None and lab.axis != axis:
        ctx.freeze(lab, node, "Attention: the mask carries channels on a non-head axis")
        lab = None
    if axis is None:
        if sm is None:
            return ctx.unify(heads, none_labels(hq), node, "Attention: mask of unknown shape")
        return heads  # the mask broadcasts over the heads
    if lab is not None:
        return ctx.unify(heads, lab.atoms, node)
    if ctx.g.is_const(node.input[3]):
        ctx.slice_param(node, 3, axis, heads, "member")
        return heads
    return ctx.unify(heads, none_labels(hq), node, "Attention: a per-head mask computed at run time")


@rule("RotaryEmbedding")
def rotary_embedding(ctx, node):
    """Rotates pairs of positions within each head, the same way for every head: heads pass through; a head is
    cut whole (3-D input: its positions unified, num_heads rewritten)."""
    x = ctx.inp(node, 0)
    if x is None:
        return
    s = ctx.shape(node.input[0])
    if s is None or len(s) not in (3, 4):
        ctx.freeze(x, node, "RotaryEmbedding with unknown input shape")
        return
    if len(s) == 4:
        if x.axis != 1:
            ctx.freeze(x, node, f"RotaryEmbedding: {WHOLE_HEADS}")
            return
        ctx.out(node, 0, x)
        return
    n = int(attr(node, "num_heads", 0) or 0)
    if not n or s[2] % n:
        ctx.freeze(x, node, "3-D RotaryEmbedding without a num_heads that divides its hidden size")
        return
    heads = _head_atoms(ctx, node, 0, 3, n, s[2] // n)
    if heads is None:
        return
    ctx.out(node, 0, x)
    _rewrite_count(ctx, node, "num_heads", heads)
