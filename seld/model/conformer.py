"""Sequence model of Stereo-RCnet: fixed sinusoidal temporal encoding and a Conformer stack.

Works on per-frame embeddings (B, T, d_model) at the feature frame rate (20 ms, T = 251).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_encoding(n_frames: int, d_model: int) -> torch.Tensor:
    """Fixed (non-learnable) sinusoidal encoding P of paper eq. 2 (Vaswani et al. 2017).

    Returns float32 (n_frames, d_model): P[t, 2i] = sin(t / 10000^(2i/d)), P[t, 2i+1] = cos(...).
    """
    pos = torch.arange(n_frames, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    enc = torch.zeros(n_frames, d_model)
    enc[:, 0::2] = torch.sin(pos * freq)
    enc[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return enc


class FeedForward(nn.Module):
    """Conformer feed-forward module: LN -> Linear(d, m*d) -> SiLU -> dropout -> Linear -> dropout."""

    def __init__(self, d_model: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_model), nn.Linear(d_model, mult * d_model), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(mult * d_model, d_model), nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """Pre-LN multi-head self-attention with fused scaled-dot-product attention.

    Position comes from the fixed encoding added at the input (the paper's T-Encoding), not from
    Conformer's relative encoding. Shapes: (B, T, d) -> (B, T, d).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.n_heads = n_heads
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # No dropout on the attention weights: it would force the unfused kernel (about 2x slower
        # on CPU, measured in bench/model.py); dropout stays on the projected output.
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU bf16 autocast would run the fused kernel in bf16, whose backward is ~10x slower
            # than float32's at these sizes (17.5 vs 1.6 ms per call, `local` preset, 2 threads).
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(b, t, d)
        return F.dropout(self.proj(y), self.dropout, self.training)


class ConvModule(nn.Module):
    """Conformer convolution module: LN -> pointwise (d -> 2d) -> GLU -> depthwise conv (kernel k)
    -> BN -> SiLU -> pointwise -> dropout. Shapes: (B, T, d) -> (B, T, d)."""

    def __init__(self, d_model: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model, bias=False)
        self.bn = nn.BatchNorm1d(d_model)
        self.pointwise_out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.pointwise_in(self.norm(x)), dim=-1).transpose(1, 2)
        y = F.silu(self.bn(self.depthwise(y))).transpose(1, 2)
        return self.dropout(self.pointwise_out(y))


class ConformerBlock(nn.Module):
    """One Conformer layer (Gulati et al., Interspeech 2020, Fig. 1).

    x + FF/2 -> x + MHSA -> x + Conv -> x + FF/2 -> LayerNorm. Shapes: (B, T, d) -> (B, T, d).
    """

    def __init__(self, d_model: int, n_heads: int, kernel: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.ff1 = FeedForward(d_model, ff_mult, dropout)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.conv = ConvModule(d_model, kernel, dropout)
        self.ff2 = FeedForward(d_model, ff_mult, dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x)
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)
