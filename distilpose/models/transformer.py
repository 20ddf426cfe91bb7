"""The pre-norm token transformer of TokenPose / DistilPose (docs/method.md#token-encoder).

Module nesting reproduces the official key names:
``layers.{i}.0.fn.norm``, ``layers.{i}.0.fn.fn.to_qkv``, ``layers.{i}.0.fn.fn.to_out.0``,
``layers.{i}.1.fn.norm``, ``layers.{i}.1.fn.fn.net.0`` and ``.net.3``
(Residual -> PreNorm -> Attention / FeedForward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sine_position_table(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine table (1, rows*cols, dim), rows-major, TokenPose's 'sine-full' embedding.

    First half of the features encodes the row, second half the column; within each half,
    feature 2m is sin(v / t_2m) and 2m+1 is cos(v / t_2m+1), with v = (index + 1) / (n + 1e-6)
    * 2pi. Computed in float32 exactly as the official code does, so its checkpoints' stored
    table can be compared with this one.
    """
    rows, cols = grid
    half = dim // 2
    eps = 1e-6
    # Same float32 operation order as the official code (cumsum / (last + eps) * 2pi).
    y = torch.arange(1, rows + 1, dtype=torch.float32)
    x = torch.arange(1, cols + 1, dtype=torch.float32)
    y = y / (y[-1:] + eps) * (2 * math.pi)
    x = x / (x[-1:] + eps) * (2 * math.pi)
    dim_t = temperature ** (2 * (torch.arange(half, dtype=torch.float32) // 2) / half)

    def encode(v: Tensor) -> Tensor:  # (n,) -> (n, half), sin/cos interleaved
        phase = v[:, None] / dim_t
        return torch.stack((phase[:, 0::2].sin(), phase[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(rows, cols, half)
    pos_x = encode(x)[None, :, :].expand(rows, cols, half)
    return torch.cat((pos_y, pos_x), dim=2).reshape(1, rows * cols, dim)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5  # official scale_with_head=True
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        # (n, t, 3*d) -> 3 x (n, heads, t, d/heads); chunk order q, k, v; heads split as (h d).
        q, k, v = self.to_qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(n, t, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """`depth` pre-norm layers; 'sine-full' re-adds the position table to the visual tokens
    before every layer but the first (the first gets it from the patch embedding)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, num_keypoints: int, dropout: float = 0.0):
        super().__init__()
        self.num_keypoints = num_keypoints
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Residual(PreNorm(dim, Attention(dim, heads, dropout))),
                    Residual(PreNorm(dim, FeedForward(dim, mlp_dim, dropout))),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        # Keypoint tokens get no position: pad the table with zero rows in front of them.
        pos_full = F.pad(pos, (0, 0, self.num_keypoints, 0))
        for i, (attn, ff) in enumerate(self.layers):
            if i > 0:
                x = x + pos_full
            x = ff(attn(x))
        return x
