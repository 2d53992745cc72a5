"""A time-conditioned residual MLP for low-dimensional data (2-D toy sets, the 1-D mixture)."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Transformer-style features of a scalar: [cos(c f_k), sin(c f_k)], f_k = scale * max_period^(-k/half).

    (B,) -> (B, dim). ``dim`` must be even.
    """

    def __init__(self, dim: int, scale: float = 1.0, max_period: float = 10000.0):
        super().__init__()
        half = dim // 2
        freqs = scale * torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        a = c.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([a.cos(), a.sin()], dim=-1)


class ResidualBlock(nn.Module):
    """h + W2 act(W1 act(h) + E(emb)): a two-layer residual block conditioned additively on the noise embedding."""

    def __init__(self, width: int, emb_width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(self.act(h)) + self.emb(emb)))


class MLP(nn.Module):
    """Residual MLP ``F(x_in, c_noise)`` for data of shape (B, dim).

    Args:
        dim: data dimension d.
        width: hidden width (128).
        depth: number of residual blocks (3).
        emb_dim: size of the sinusoidal noise embedding (64).
        input_freqs: 0 feeds raw coordinates; k > 0 adds k sinusoidal features per coordinate (helps sharp 2-D shapes).
        input_scale: highest input frequency in radians per data unit (25).
    """

    def __init__(
        self,
        dim: int,
        width: int = 128,
        depth: int = 3,
        emb_dim: int = 64,
        input_freqs: int = 0,
        input_scale: float = 25.0,
    ):
        super().__init__()
        self.dim, self.width, self.depth = dim, width, depth
        self.noise_embed = SinusoidalEmbedding(emb_dim)
        self.emb = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.input_embed = SinusoidalEmbedding(2 * input_freqs, scale=input_scale) if input_freqs else None
        in_width = dim * (1 + 2 * input_freqs)
        self.inp = nn.Linear(in_width, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, width) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.emb(self.noise_embed(c_noise))
        feats = x
        if self.input_embed is not None:
            features = self.input_embed(x.reshape(-1)).reshape(x.shape[0], self.inp.in_features - self.dim)
            feats = torch.cat([x, features], dim=1)  # (B, d (1 + 2 input_freqs)); B = 0 is fine
        h = self.inp(feats)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
