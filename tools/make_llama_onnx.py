"""A Llama-style decoder (grouped-query attention, RMSNorm, SwiGLU, rotary; random weights) exported to ONNX
with the TorchScript exporter and its weights in one external-data file: the model of issue 15, item 8.

Plain torch modules, no transformers dependency. TinyLlama's shape by default (hidden 2048, 22 layers, 32 heads,
4 KV heads, intermediate 5632, vocab 32000: 1.1B parameters, 4.4 GB fp32); `--layers N` makes smaller proxies.

Memory: the exporter runs with export_params=False, so it never copies a weight into its protobuf; the weights
are then written one by one from the torch parameters into MODEL.onnx.data (the peak is the torch model plus a
little). Linear weights are stored [in, out] and used by `x @ W`, which exports to the same MatMul on an
[in, out] initializer that nn.Linear gives after the exporter's constant folding of its transpose.

    python tools/make_llama_onnx.py OUT.onnx [--layers 22] [--hidden 2048] ...
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

TINYLLAMA = dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000)


def build(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, seed: int = 0):
    import torch
    from torch import nn

    head_dim = hidden // heads

    def weight(*shape, std=0.02):
        return nn.Parameter(torch.empty(*shape).normal_(0.0, std))

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = weight(hidden, heads * head_dim)
            self.k = weight(hidden, kv_heads * head_dim)
            self.v = weight(hidden, kv_heads * head_dim)
            self.o = weight(heads * head_dim, hidden)

        def forward(self, x, cos, sin, mask):
            b, s, _ = x.shape
            q = (x @ self.q).view(b, s, heads, head_dim).transpose(1, 2)
            k = (x @ self.k).view(b, s, kv_heads, head_dim).transpose(1, 2)
            v = (x @ self.v).view(b, s, kv_heads, head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            rep = heads // kv_heads   # repeat_kv as transformers writes it: expand, then merge
            k = k[:, :, None, :, :].expand(b, kv_heads, rep, s, head_dim).reshape(b, heads, s, head_dim)
            v = v[:, :, None, :, :].expand(b, kv_heads, rep, s, head_dim).reshape(b, heads, s, head_dim)
            scores = (q @ k.transpose(2, 3)) / math.sqrt(head_dim) + mask
            out = torch.softmax(scores, dim=-1) @ v
            return out.transpose(1, 2).reshape(b, s, heads * head_dim) @ self.o

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = weight(hidden, intermediate)
            self.up = weight(hidden, intermediate)
            self.down = weight(intermediate, hidden)

        def forward(self, x):
            return (nn.functional.silu(x @ self.gate) * (x @ self.up)) @ self.down

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.attn, self.mlp_norm, self.mlp = RMSNorm(), Attention(), RMSNorm(), MLP()

        def forward(self, x, cos, sin, mask):
            x = x + self.attn(self.attn_norm(x), cos, sin, mask)
            return x + self.mlp(self.mlp_norm(x))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = weight(vocab, hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = RMSNorm()
            self.lm_head = weight(hidden, vocab)
            self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim),
                                 persistent=False)

        def forward(self, input_ids):
            s = input_ids.shape[1]
            x = self.embed[input_ids]
            pos = torch.arange(s, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]
            idx = torch.arange(s)
            mask = (idx[None, :] > idx[:, None]).float() * torch.finfo(torch.float32).min
            for block in self.blocks:
                x = block(x, cos, sin, mask)
            return self.norm(x) @ self.lm_head

    torch.manual_seed(seed)
    with torch.no_grad():
        return Llama().eval()


def export(path, opset: int = 17, seed: int = 0, **shape) -> dict:
    """Export the model to `path` (weights in `path`.data); returns the shape and the parameter count."""
    import onnx
    import torch

    cfg = {**TINYLLAMA, **shape}
    model = build(**cfg, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    ids = torch.zeros(1, 8, dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(model, (ids,), str(tmp), dynamo=False, opset_version=opset, export_params=False,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "logits": {0: "batch", 1: "sequence"}})
    proto = onnx.load(str(tmp))
    tmp.unlink()
    params = dict(model.named_parameters())
    data_name = path.name + ".data"
    offset = 0
    count = 0
    with open(path.parent / data_name, "wb") as data:
        inputs = [vi for vi in proto.graph.input]
        del proto.graph.input[:]
        for vi in inputs:
            p = params.get(vi.name)
            if p is None:
                proto.graph.input.append(vi)
                continue
            arr = p.detach().numpy()
            t = proto.graph.initializer.add()
            t.name, t.data_type, t.data_location = vi.name, onnx.TensorProto.FLOAT, onnx.TensorProto.EXTERNAL
            t.dims.extend(arr.shape)
            pad = -offset % 4096   # page-aligned tensors: readers can map them
            data.write(b"\0" * pad)
            offset += pad
            data.write(arr.tobytes())
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                e = t.external_data.add()
                e.key, e.value = key, value
            offset += arr.nbytes
            count += arr.size
    proto.ir_version = min(proto.ir_version, 10)
    onnx.save(proto, str(path))
    return {**cfg, "params": count, "bytes": offset, "opset": opset}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    for key, value in TINYLLAMA.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    info = export(a.out, opset=a.opset, seed=a.seed, **{k: getattr(a, k) for k in TINYLLAMA})
    print(info)


if __name__ == "__main__":
    main()
