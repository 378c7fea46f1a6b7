"""Two small trained transformers for pruning-quality benchmarks (issue 15, item 9), trained offline on CPU.

    python tools/train_transformers.py                      # both models, seed 0 (cached: trains only once)
    python tools/train_transformers.py --models lm --seeds 0 1 2 --force

* `vit_digits`: a ViT on sklearn's 8x8 digits (1x8x8 images, 2x2 patches -> 16 tokens + a class token; dim 64,
  4 heads, 4 pre-norm layers, GELU MLP 4x). Attention is written out as timm's ViT writes it (fused qkv,
  reshape to heads, unbind, q @ k^T, softmax, @ v, reshape(B, N, -1)); `spa.models.transformer`'s block indexes
  qkv[0..2] instead of unbind, which Torch-Pruning 1.6 cannot trace (IndexError in its importance). Split: stratified 1257 train / 540 test
  (split seed 0, as the digits benchmark nets), pixels / 16 standardized with the train statistics.
* `char_lm`: a GPT-style byte-level language model (vocab 256; dim 128, 4 layers, grouped-query attention with 4
  query heads sharing 2 KV heads via repeat_kv, rotary position embedding, RMSNorm, SwiGLU MLP, no biases,
  context 64) on the running interpreter's standard-library sources (`Lib/*.py`, top level, sorted): the files in
  HELD_OUT are the test text, the rest the training text.

Weights and a JSON (config, metric, seconds) go to .bench/transformers/{model}-seed{seed}.{pt,json}; the ONNX export
(TorchScript exporter, dynamo=False, opset 17, dynamic batch; the LM takes `input_ids` [B, 64] int64 and returns
`logits` [B, 64, 256]) is written by `export_onnx` and checked against torch in onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see tools/bench_quality.py)
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = ROOT / ".bench" / "transformers"
MODELS = ("vit_digits", "char_lm")
HELD_OUT = ("argparse.py", "calendar.py", "fractions.py", "heapq.py", "textwrap.py")  # the LM's test text


def log(msg: str) -> None:
    print(f"[train-tf {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VitConfig:
    img: int = 8
    patch: int = 2
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 256
    num_classes: int = 10
    epochs: int = 80
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    max_shift: int = 1


@dataclass(frozen=True)
class LmConfig:
    vocab: int = 256
    dim: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    mlp_dim: int = 352  # SwiGLU hidden width (~ 8/3 x dim, rounded to 32)
    context: int = 64
    rope_base: float = 10000.0
    steps: int = 500
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1


class VitAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, dim // heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1))


class VitBlock(nn.Module):
    """Pre-norm block; parameter names as `spa.models.transformer.ViTBlock`."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), VitAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """ViT on 1xHxW images: Conv patch embedding, class token, learned positions, pre-norm blocks."""

    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, cfg.dim, cfg.patch, cfg.patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (cfg.img // cfg.patch) ** 2 + 1, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(*(VitBlock(cfg.dim, cfg.heads, cfg.mlp_dim) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GQAttention(nn.Module):
    """Llama-style attention: q/k/v/o without bias, rotary q and k, KV heads repeated for their query heads."""

    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.num_heads // self.num_kv_heads  # repeat_kv as transformers writes it
        k = k[:, :, None].expand(B, self.num_kv_heads, rep, T, self.head_dim).reshape(B, -1, T, self.head_dim)
        v = v[:, :, None].expand(B, self.num_kv_heads, rep, T, self.head_dim).reshape(B, -1, T, self.head_dim)
        att = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5 + mask
        out = att.softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LmBlock(nn.Module):
    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.input_norm, self.attn = RMSNorm(cfg.dim), GQAttention(cfg)
        self.post_norm, self.mlp = RMSNorm(cfg.dim), SwiGLU(cfg.dim, cfg.mlp_dim)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        return x + self.mlp(self.post_norm(x))


class CharLM(nn.Module):
    """Byte-level GPT-style LM: input_ids [B, T] (T <= context) -> logits [B, T, vocab]."""

    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(LmBlock(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        head_dim = cfg.dim // cfg.heads
        inv = 1.0 / cfg.rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        ang = torch.outer(torch.arange(cfg.context).float(), inv)
        ang = torch.cat((ang, ang), -1)  # [T, head_dim]
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        mask = torch.full((cfg.context, cfg.context), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        cos, sin, mask = self.cos[:T], self.sin[:T], self.mask[:T, :T]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def build(model_name: str, seed: int, cfg=None) -> nn.Module:
    torch.manual_seed(seed)
    cfg = cfg or default_config(model_name)
    return DigitsViT(cfg) if model_name == "vit_digits" else CharLM(cfg)


def default_config(model_name: str):
    return {"vit_digits": VitConfig, "char_lm": LmConfig}[model_name]()


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Digits:
    x_train: np.ndarray  # [N, 1, 8, 8] float32, standardized
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    fill: float  # standardized background value (for shift augmentation)


def digits8() -> Digits:
    """sklearn's digits at their native 8x8, the same stratified 1257 / 540 split (seed 0) as `digits32`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from spa.models.datasets import DIGITS_TEST

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=DIGITS_TEST, stratify=d.target, random_state=0)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return Digits(((x_tr - mean) / std).astype(np.float32), y_tr.astype(np.int64),
                  ((x_te - mean) / std).astype(np.float32), y_te.astype(np.int64), -mean / std)


@dataclass
class Corpus:
    train: np.ndarray  # uint8 bytes
    test: np.ndarray
    train_files: list[str]
    test_files: list[str]


def stdlib_corpus() -> Corpus:
    """The interpreter's top-level Lib/*.py, sorted; HELD_OUT files are the test text (files joined by a NUL)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p.name for p in lib.glob("*.py"))
    test_files = [f for f in files if f in HELD_OUT]
    train_files = [f for f in files if f not in HELD_OUT]

    def read(names):
        return np.frombuffer(b"\0".join((lib / n).read_bytes() for n in names), dtype=np.uint8)

    return Corpus(read(train_files), read(test_files), train_files, test_files)


def windows(text: np.ndarray, n: int, context: int, seed: int | None) -> np.ndarray:
    """`n` token windows [n, context] int64: random starts (seed given) or consecutive non-overlapping ones."""
    if seed is None:
        starts = np.arange(n) * context
        starts = starts[starts + context <= len(text)]
    else:
        starts = np.random.default_rng(seed).integers(0, len(text) - context, size=n)
    return np.stack([text[s:s + context] for s in starts]).astype(np.int64)


def test_windows(corpus: Corpus, context: int, n: int = 512) -> np.ndarray:
    """The held-out evaluation set: the first `n` non-overlapping windows of the test text."""
    return windows(corpus.test, n, context, None)


def nll_from_logits(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (positions 1..T-1 of each window) and the token count."""
    z = logits[:, :-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    tgt = ids[:, 1:]
    return float(-np.take_along_axis(logp, tgt[..., None], -1).sum()), int(tgt.size)


@torch.no_grad()
def torch_perplexity(model: nn.Module, ids: np.ndarray, batch: int = 128) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        nll, n = nll_from_logits(model(torch.from_numpy(ids[i:i + batch])).numpy(), ids[i:i + batch])
        total, count = total + nll, count + n
    return math.exp(total / count)


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
def _cosine(opt, n_steps: int, warm: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, n_steps) / n_steps)))


def _shift(x, max_shift, fill, gen):
    from spa.models.datasets import random_shift
    return random_shift(x, max_shift, fill, gen) if max_shift else x


def fit_vit(model: DigitsViT, cfg: VitConfig, data: Digits, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    per_epoch = math.ceil(len(x) / cfg.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _cosine(opt, cfg.epochs * per_epoch, 5 * per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(cfg.epochs):
        model.train()
        perm, total = torch.randperm(len(x), generator=gen), 0.0
        for i in range(0, len(x), cfg.batch):
            idx = perm[i:i + cfg.batch]
            loss = loss_fn(model(_shift(x[idx], cfg.max_shift, data.fill, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        if (epoch + 1) % 20 == 0 or epoch + 1 == cfg.epochs:
            log(f"  vit epoch {epoch + 1}/{cfg.epochs}: loss {total / len(x):.4f}, "
                f"test acc {torch_accuracy(model, data.x_test, data.y_test):.4f}")
    return torch_accuracy(model, data.x_test, data.y_test)


def fit_lm(model: CharLM, cfg: LmConfig, corpus: Corpus, seed: int) -> float:
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = _cosine(opt, cfg.steps, 50)
    test = test_windows(corpus, cfg.context, 128)
    for step in range(cfg.steps):
        model.train()
        starts = rng.integers(0, len(corpus.train) - cfg.context - 1, size=cfg.batch)
        ids = torch.from_numpy(np.stack([corpus.train[s:s + cfg.context + 1] for s in starts]).astype(np.int64))
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            log(f"  lm step {step + 1}/{cfg.steps}: train loss {float(loss):.4f}, "
                f"held-out ppl (128 windows) {torch_perplexity(model, test):.3f}")
    return torch_perplexity(model, test_windows(corpus, cfg.context))


def cache_paths(model_name: str, seed: int, cache: Path = CACHE) -> tuple[Path, Path]:
    stem = cache / f"{model_name}-seed{seed}"
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def train(model_name: str, seed: int, *, force: bool = False, cfg=None, cache: Path = CACHE):
    """(trained model in eval mode, metadata dict); trains only when no weights with this config are cached.

    cfg: a VitConfig / LmConfig (default: the benchmark's); a tiny one with few steps makes an untrained
    stand-in for tests.
    """
    cfg = cfg or default_config(model_name)
    pt, meta = cache_paths(model_name, seed, cache)
    model = build(model_name, seed, cfg)
    if pt.exists() and meta.exists() and not force:
        info = json.loads(meta.read_text())
        if info.get("config") == asdict(cfg):
            model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
            return model.eval(), info
        log(f"{model_name} seed {seed}: cached weights have another config; retraining")
    torch.set_num_threads(1)  # on the shared 2-core machine 1 thread trained ~15x faster than 2 (load ~16)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"training {model_name} seed {seed} ({n_params:,} parameters): {cfg}")
    t0 = time.perf_counter()
    if model_name == "vit_digits":
        data = digits8()
        metric = {"test_accuracy": fit_vit(model, cfg, data, seed)}
    else:
        corpus = stdlib_corpus()
        metric = {"test_perplexity": fit_lm(model, cfg, corpus, seed), "train_bytes": len(corpus.train),
                  "test_bytes": len(corpus.test), "test_files": corpus.test_files,
                  "train_files": len(corpus.train_files), "python": sys.version.split()[0]}
    info = {"model": model_name, "seed": seed, **metric, "parameters": n_params,
            "train_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "config": asdict(cfg)}
    pt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), pt)
    meta.write_text(json.dumps(info, indent=1))
    log(f"{model_name} seed {seed}: {metric} in {info['train_seconds']} s -> {pt}")
    return model.eval(), info


def config_from(model_name: str, d: dict):
    cls = {"vit_digits": VitConfig, "char_lm": LmConfig}[model_name]
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, path, example: np.ndarray, input_name: str, atol: float = 1e-4) -> Path:
    """TorchScript export (dynamo=False, opset 17, dynamic batch), checked against torch in onnxruntime on
    `example` (train_bench's export, with this model's input name)."""
    from tools import train_bench

    return train_bench.export_onnx(model, path, input_shape=example.shape[1:], check_x=example,
                                   input_name=input_name, atol=atol)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--force", action="store_true", help="retrain even when weights are cached")
    args = ap.parse_args(argv)
    for name in args.models:
        for seed in args.seeds:
            train(name, seed, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
