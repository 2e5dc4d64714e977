"""A Llama-style decoder: token embedding, RMSNorm, rotary positions, grouped-query attention
through `F.scaled_dot_product_attention` (causal), SwiGLU MLP, LM head, optional loss.

Written the way model code is usually written (GQA by `repeat_interleave`, RoPE from
`arange(S)` inside `forward`), because seqshard must compile ordinary models, not models written
for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    vocab: int
    """Vocabulary size."""
    dim: int
    """Hidden size d."""
    layers: int
    """Number of decoder blocks."""
    heads: int
    """Query heads h."""
    kv_heads: int
    """Key/value heads g (GQA: h = g·r; MQA: g = 1)."""
    ffn: int
    """SwiGLU inner size f."""
    rope_theta: float = 500000.0
    """RoPE base."""
    eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Use the embedding matrix as the LM head."""

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}")
        if (self.dim // self.heads) % 2:
            raise ValueError(f"head dim {self.dim // self.heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


CONFIGS: dict[str, LlamaConfig] = {
    # tests: sizes that are not powers of two, so a mixed-up factor shows up as a wrong size
    "tiny": LlamaConfig(vocab=96, dim=48, layers=2, heads=6, kv_heads=2, ffn=80),
    "tiny-mha": LlamaConfig(vocab=96, dim=48, layers=2, heads=4, kv_heads=4, ffn=80),
    "tiny-mqa": LlamaConfig(vocab=96, dim=48, layers=2, heads=4, kv_heads=1, ffn=80),
    "small": LlamaConfig(vocab=4096, dim=512, layers=4, heads=8, kv_heads=4, ffn=1408),
    "llama3-1b": LlamaConfig(vocab=128256, dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192,
                             tie_embeddings=True),
    "llama3-8b": LlamaConfig(vocab=128256, dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336),
    "llama3-70b": LlamaConfig(vocab=128256, dim=8192, layers=80, heads=64, kv_heads=8, ffn=28672),
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)     # [b, h, s, e]
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, g, s, e]
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, g, s, e]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)                                          # [b, (g r), s, e]
        v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)                  # [b, h, s, e]
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """`forward(input_ids[B, S], labels[B, S] | None)` → logits `[B, S, vocab]`, or the mean
    next-token cross-entropy when labels are given (labels already shifted; -100 is ignored)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids, labels=None):
        S = input_ids.shape[1]
        pos = torch.arange(S, device=input_ids.device)
        freqs = torch.outer(pos.float(), self.inv_freq)             # [s, e/2]
        emb = torch.cat((freqs, freqs), dim=-1)                     # [s, e]
        x = self.embed(input_ids)                                   # [b, s, d]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))                         # [b, s, v]
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def example_inputs(cfg: LlamaConfig, batch: int, seq: int, *, labels: bool = True,
                   device="cpu", generator: torch.Generator | None = None):
    ids = torch.randint(0, cfg.vocab, (batch, seq), device=device, generator=generator)
    if not labels:
        return (ids,)
    return ids, torch.randint(0, cfg.vocab, (batch, seq), device=device, generator=generator)
