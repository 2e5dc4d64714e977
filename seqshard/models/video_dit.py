"""A spatial-temporal diffusion transformer on video latents `x[B, T, P, C]` (frames × patches),
in the style of Latte and OpenSora's STDiT.

Blocks alternate: a spatial block attends over the P patches of each frame (batched over B·T), a
temporal block over the T frames of each patch position (batched over B·P). Every block is
conditioned on the diffusion timestep by adaLN (shift, scale and gate from the timestep
embedding). Positions are sinusoidal in `arange(P)` and `arange(T)`, computed in `forward`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True, kw_only=True)
class VideoDiTConfig:
    in_channels: int
    """Channels of one latent patch (C of the input)."""
    dim: int
    """Hidden size."""
    pairs: int
    """Number of (spatial, temporal) block pairs."""
    heads: int
    """Attention heads."""
    mlp_ratio: float = 4.0
    """MLP inner size over the hidden size."""
    freq_dim: int = 256
    """Size of the sinusoidal timestep features."""

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.dim % 4:
            raise ValueError(f"dim {self.dim} must be divisible by 4 for the 2-axis sinusoids")

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)


CONFIGS: dict[str, VideoDiTConfig] = {
    "tiny": VideoDiTConfig(in_channels=6, dim=48, pairs=2, heads=4, mlp_ratio=2.0, freq_dim=32),
    "small": VideoDiTConfig(in_channels=16, dim=384, pairs=2, heads=6),
    # the configuration of docs/anchors.md's DiT rows: hidden 1152, 16 heads, 4 block pairs
    "dit-bench": VideoDiTConfig(in_channels=16, dim=1152, pairs=4, heads=16),
    # Latte-XL / STDiT-XL size: 28 blocks (14 pairs), hidden 1152, 16 heads
    "stdit-xl": VideoDiTConfig(in_channels=16, dim=1152, pairs=14, heads=16),
}


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """`pos[n]` → `[n, dim]` sin/cos features (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device).float() / half)
    args = pos.float()[:, None] * freqs[None]
    return torch.cat((args.sin(), args.cos()), dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                             # x: [n, l, c]
        N, L, C = x.shape
        qkv = self.qkv(x).view(N, L, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                # [n, h, l, e] each
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(N, L, C))


class STBlock(nn.Module):
    """One transformer block; `temporal` says which axis it attends over."""

    def __init__(self, cfg: VideoDiTConfig, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_dim, cfg.dim))
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim)

    def forward(self, x, c):                                          # x: [b, t, p, d], c: [b, d]
        B, T, P, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            m[:, None, None] for m in self.ada(F.silu(c)).chunk(6, dim=-1))
        h = modulate(self.norm1(x), shift1, scale1)
        if self.temporal:                                             # attend over t, batch (b, p)
            h = h.permute(0, 2, 1, 3).reshape(B * P, T, D)
            h = self.attn(h).view(B, P, T, D).permute(0, 2, 1, 3)
        else:                                                         # attend over p, batch (b, t)
            h = self.attn(h.reshape(B * T, P, D)).view(B, T, P, D)
        x = x + gate1 * h
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class VideoDiT(nn.Module):
    """`forward(x[B, T, P, C], t[B], target[B, T, P, C] | None)` → the predicted noise
    `[B, T, P, C]`, or its mean squared error against `target` when given."""

    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.in_channels, cfg.dim)
        self.t_embed = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                     nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(STBlock(cfg, temporal=bool(i % 2)) for i in range(2 * cfg.pairs))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.in_channels)

    def forward(self, x, t, target=None):
        B, T, P, _ = x.shape
        half = self.cfg.dim // 2
        pos = (sinusoid(torch.arange(T, device=x.device), half)[:, None, :].expand(T, P, half),
               sinusoid(torch.arange(P, device=x.device), half)[None, :, :].expand(T, P, half))
        h = self.patch_embed(x)
        h = h + torch.cat(pos, dim=-1).to(h.dtype)                    # [b, t, p, d]
        c = self.t_embed(sinusoid(t, self.cfg.freq_dim).to(h.dtype))  # [b, d]
        for block in self.blocks:
            h = block(h, c)
        shift, scale = (m[:, None, None] for m in self.final_ada(F.silu(c)).chunk(2, dim=-1))
        out = self.out(modulate(self.final_norm(h), shift, scale))   # [b, t, p, c]
        if target is None:
            return out
        return F.mse_loss(out.float(), target.float())


def example_inputs(cfg: VideoDiTConfig, batch: int, frames: int, patches: int, *,
                   target: bool = True, device="cpu", generator: torch.Generator | None = None):
    x = torch.randn(batch, frames, patches, cfg.in_channels, device=device, generator=generator)
    t = torch.randint(0, 1000, (batch,), device=device, generator=generator).float()
    if not target:
        return x, t
    return x, t, torch.randn(batch, frames, patches, cfg.in_channels, device=device, generator=generator)
