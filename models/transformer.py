"""ViT-Tiny and a BERT encoder with hand-written multi-head attention.

Attention is spelled out (reshape to heads, q @ k^T * scale, softmax, @ v) instead of
nn.MultiheadAttention / SDPA so the exported graph shows the realistic MatMul/Reshape
pattern a pruner must understand. Head reshapes use config constants (heads, head_dim).
"""
import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention; fused qkv Linear (ViT) or separate q/k/v Linears (BERT)."""

    def __init__(self, dim, heads, fused_qkv=True):
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, dim // heads, (dim // heads) ** -0.5
        self.fused = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        if self.fused:
            qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = (lin(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
                       for lin in (self.query, self.key, self.value))
        attn = (q @ k.transpose(-2, -1)) * self.scale
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))

    def matmul_macs(self, x) -> int:
        """MACs of the two activation x activation matmuls (q@k^T and attn@v), for counting.py."""
        B, N, _ = x.shape
        return 2 * B * self.heads * N * N * self.head_dim


def mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class ViTBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), mlp(dim, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, img=224, patch=16, dim=192, depth=12, heads=3, mlp_dim=768, num_classes=1000):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B, N, C
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class BertLayer(nn.Module):
    """Post-norm BERT encoder layer."""

    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.attention, self.attn_norm = Attention(dim, heads, fused_qkv=False), nn.LayerNorm(dim, eps=1e-12)
        self.ffn, self.ffn_norm = mlp(dim, ffn), nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x):
        x = self.attn_norm(x + self.attention(x))
        return self.ffn_norm(x + self.ffn(x))


class Bert(nn.Module):
    def __init__(self, vocab=1000, max_pos=128, dim=256, heads=4, ffn=1024, layers=2, num_classes=2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(max_pos, dim)
        self.register_buffer("position_ids", torch.arange(max_pos).unsqueeze(0), persistent=False)
        self.emb_norm = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.Sequential(*(BertLayer(dim, heads, ffn) for _ in range(layers)))
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, input_ids):
        pos = self.position_embeddings(self.position_ids[:, : input_ids.shape[1]])
        x = self.layers(self.emb_norm(self.word_embeddings(input_ids) + pos))
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


VIT_SMALL = dict(img=32, patch=8, dim=64, depth=2, heads=2, mlp_dim=256, num_classes=10)
BERT_FULL = dict(vocab=1000, max_pos=128, dim=256, heads=4, ffn=1024, layers=2)
BERT_SMALL = dict(vocab=100, max_pos=32, dim=64, heads=2, ffn=256, layers=2)


def vit_tiny(small: bool = False) -> nn.Module:
    return ViT(**VIT_SMALL) if small else ViT()


def bert_layer(small: bool = False) -> nn.Module:
    return Bert(**(BERT_SMALL if small else BERT_FULL))
