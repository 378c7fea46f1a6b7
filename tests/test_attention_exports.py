"""Attention as torch exports it (issue 15, item 1): heads on the graphs of both torch exporters, with dynamic
batch and sequence axes, multi-head (BERT-like) and grouped-query (Llama-like: RMSNorm, rotary, repeat_kv,
SwiGLU) attention, written with scaled_dot_product_attention and spelled out.

With dynamic axes the exporters reshape K to `[B·H, S, D]` for its transpose (dynamo) and build the head
reshapes from Shape() reads; grouped-query attention repeats KV heads with Unsqueeze/Expand/Reshape. Every run
must verify (checker, onnxruntime, the disconnected-channels reference); the counts below are exact.
"""
from __future__ import annotations

import math

import onnx
import pytest

from spa import driver

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

D, S, IN, OUT = 32, 8, 16, 5


class MHA(nn.Module):
    """BERT-like post-norm layer: separate q/k/v projections, LayerNorm, GELU MLP."""

    def __init__(self, heads=4, sdpa=True):
        super().__init__()
        self.h, self.hd, self.sdpa = heads, D // heads, sdpa
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.ln = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 64), nn.Linear(64, D)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (lin(x).view(b, s, self.h, self.hd).transpose(1, 2) for lin in (self.q, self.k, self.v))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd), -1) @ v
        x = self.ln(x + self.o(a.transpose(1, 2).reshape(b, s, D)))
        return x + self.fc2(F.gelu(self.fc1(x)))


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


class LlamaLayer(nn.Module):
    """Pre-norm Llama-like layer: RMSNorm, rotary q/k, grouped-query attention (repeat_kv), SwiGLU MLP."""

    def __init__(self, heads=4, kv_heads=2, sdpa=True, enable_gqa=False, hf_repeat=False):
        super().__init__()
        self.h, self.kv, self.hd, self.sdpa, self.enable_gqa = heads, kv_heads, D // heads, sdpa, enable_gqa
        self.hf_repeat = hf_repeat
        self.q = nn.Linear(D, heads * self.hd, bias=False)
        self.k = nn.Linear(D, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(D, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(heads * self.hd, D, bias=False)
        self.n1, self.n2 = RMSNorm(D), RMSNorm(D)
        self.gate, self.up, self.down = nn.Linear(D, 48, bias=False), nn.Linear(D, 48, bias=False), \
            nn.Linear(48, D, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        f = torch.outer(torch.arange(64).float(), inv)
        self.register_buffer("cos", torch.cat((f, f), -1).cos())
        self.register_buffer("sin", torch.cat((f, f), -1).sin())

    def repeat_kv(self, t, b, s):
        n = self.h // self.kv
        if self.hf_repeat:  # Hugging Face's: every size read from t, the head count num_key_value_heads * n_rep
            batch, kv, slen, hd = t.shape
            return t[:, :, None, :, :].expand(batch, kv, n, slen, hd).reshape(batch, kv * n, slen, hd)
        return t[:, :, None].expand(b, self.kv, n, s, self.hd).reshape(b, self.h, s, self.hd)

    def forward(self, x):
        b, s, _ = x.shape
        y = self.n1(x)
        heads = (-1, -1) if self.hf_repeat else (self.h, self.kv)  # Hugging Face: view(*input_shape, -1, hd)
        q = self.q(y).view(b, s, heads[0], self.hd).transpose(1, 2)
        k = self.k(y).view(b, s, heads[1], self.hd).transpose(1, 2)
        v = self.v(y).view(b, s, heads[1], self.hd).transpose(1, 2)
        cos, sin = self.cos[:s], self.sin[:s]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.enable_gqa:  # the KV heads go to the attention op as they are
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif self.sdpa:
            k, v = self.repeat_kv(k, b, s), self.repeat_kv(v, b, s)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = self.repeat_kv(k, b, s), self.repeat_kv(v, b, s)
            mask = torch.full((s, s), float("-inf")).triu(1)
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd) + mask, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, s, D))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(IN, D), block, nn.Linear(D, OUT)

    def forward(self, x):
        return self.head(self.block(self.inp(x)))


def export(block, path, dynamo: bool, opset: int | None = None) -> str:
    """Both exporters with a dynamic batch and sequence, as users export transformers (dynamo at opset 23 emits
    the Attention and RMSNormalization ops)."""
    torch.manual_seed(0)
    net, x = Net(block).eval(), torch.randn(1, S, IN)
    if dynamo:
        dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", min=2, max=64)},)
        torch.onnx.export(net, (x,), str(path), dynamo=True, opset_version=opset or 18, input_names=["x"],
                          output_names=["y"], dynamic_shapes=dims)
    else:
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch"}})
    m = onnx.load(str(path))
    if m.ir_version > 10:  # onnxruntime 1.32 reads IR <= 11; torch 2.13 writes newer
        m.ir_version = 10
        onnx.save(m, str(path))
    return str(path)


SHAPES = {"x": (1, S, IN)}
BLOCKS = {
    "mha-sdpa": lambda: MHA(sdpa=True),
    "mha-explicit": lambda: MHA(sdpa=False),
    "gqa-sdpa": lambda: LlamaLayer(sdpa=True),
    "gqa-explicit": lambda: LlamaLayer(sdpa=False),
    "gqa-hf-repeat": lambda: LlamaLayer(hf_repeat=True),  # TorchScript: Mul(Gather(Shape(k), 1), n_rep)
    "gqa-in-op": lambda: LlamaLayer(enable_gqa=True),  # KV heads not repeated: the attention op groups them
}
CASES = [pytest.param(name, dynamo, None, id=f"{name}-{'dynamo' if dynamo else 'torchscript'}")
         for name in BLOCKS if name != "gqa-in-op" for dynamo in (False, True)]
CASES += [pytest.param(name, True, 23, id=f"{name}-dynamo-opset23") for name in ("mha-sdpa", "gqa-sdpa", "gqa-in-op")]
CASES += [pytest.param("gqa-in-op", True, None, id="gqa-in-op-dynamo")]


def macs(name: str, heads_kept: int, hidden_kept: int) -> int:
    """The MACs of Net(block) at sequence S, by hand: projections, Q·Kᵀ and A·V, MLP, input and output layers."""
    hd = D // 4
    if name.startswith("mha"):  # 4 heads of q, k, v; o; 2-layer MLP of 64
        attn = 4 * S * D * heads_kept * hd + 2 * heads_kept * S * S * hd
        mlp = 2 * S * D * hidden_kept
    else:  # 4 query heads over 2 KV heads (a unit: 1 KV head + its 2 query heads); SwiGLU of 48
        attn = 2 * S * D * 2 * heads_kept * hd + 2 * S * D * heads_kept * hd + 2 * 2 * heads_kept * S * S * hd
        mlp = 3 * S * D * hidden_kept
    return S * IN * D + attn + mlp + S * D * OUT


UNITS = {"mha": (4, 64), "gqa": (2, 48)}  # (head units, MLP hidden channels)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name, dynamo, opset):
        if (name, dynamo, opset) not in cache:
            path = tmp_path_factory.mktemp("attn") / f"{name}-{int(dynamo)}-{opset}.onnx"
            cache[name, dynamo, opset] = export(BLOCKS[name](), path, dynamo, opset)
        return cache[name, dynamo, opset]

    return get


@pytest.mark.parametrize("name, dynamo, opset", CASES)
def test_attention_heads_and_mlp_prune_on_every_export(name, dynamo, opset, exported, tmp_path):
    """Heads are found through dynamo's [B·H, S, D] reshapes of K (their targets built from Shape() reads, the
    static head count sliced out of them) and through repeat_kv's Unsqueeze/Expand/Reshape (TorchScript's expand
    sizes are Where(sizes == -1, 1, sizes); with Hugging Face's repeat_kv the repeated head count is the KV count
    read at run time times n_rep); a grouped-query unit is one KV head with the query heads sharing it.
    At opset 23 the heads go through the Attention op (grouped-query inside it for gqa-in-op) and RMSNorm
    through RMSNormalization. Before, Q's heads were cut alone (exit 1) or, once Q·Kᵀ paired both sides, every
    head was frozen; the opset-23 ops had no rule."""
    path = exported(name, dynamo, opset)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ({"Attention", "RMSNormalization"} & ops) == ({"Attention"} | ({"RMSNormalization"} if "gqa" in name
                                                                          else set()) if opset == 23 else set())
    analysis = driver.analyse(driver.load(path, input_shapes=SHAPES))
    heads, hidden = UNITS[name[:3]]
    assert sorted(g.size for g in analysis.groups if g.prunable) == sorted([heads, hidden])
    assert all(g.prunable in (0, g.size) for g in analysis.groups)
    rep = driver.prune(path, str(tmp_path / "out.onnx"), ratio=0.3, fast=True, input_shapes=SHAPES).report
    assert rep["verification"]["status"] == "passed" and rep["verification"]["inputs"] == 2  # and a doubled batch
    gone_heads, gone_hidden = round(0.3 * heads), int(0.3 * hidden + 0.5)
    assert rep["macs"]["before"] == macs(name, heads, hidden)
    assert rep["macs"]["after"] == macs(name, heads - gone_heads, hidden - gone_hidden)
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim][:2] == ["batch", "seq"]
