"""Baseline-A: the official DCASE2025 stereo SELD audio-only baseline (spec §7), same framework.

CNN (3 x conv3x3-BN-ReLU-maxpool-dropout, pooling (5,4), (1,4), (1,2)) -> 2-layer BiGRU with the
forward and backward halves multiplied -> 2 x (MHSA + residual + LayerNorm) -> Linear -> Linear ->
multi-ACCDOA (B, 50, 3, 13, 3): x, y tanh, distance (m) ReLU. Reads log-mel (B, 2, 251, 64).
"""

from __future__ import annotations

import torch
from torch import nn

from seld.config import N_CLASSES, N_LABEL_FRAMES, ModelConfig

TIME_POOL = (5, 1, 1)
FREQ_POOL = (4, 4, 2)


class BaselineSELD(nn.Module):
    """Official baseline architecture; widths from ModelConfig.baseline_* (official: 64 filters,
    GRU hidden 128, 8 heads: 734 261 parameters with 64 mel bins)."""

    def __init__(self, cfg: ModelConfig, n_mels: int = 64, in_channels: int = 2) -> None:
        super().__init__()
        self.cfg = cfg
        filters, hidden = cfg.baseline_filters, cfg.baseline_rnn_hidden
        widths = (in_channels, *([filters] * len(TIME_POOL)))
        self.conv = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], 3, padding=1), nn.BatchNorm2d(widths[i + 1]),
                nn.ReLU(inplace=True), nn.MaxPool2d((TIME_POOL[i], FREQ_POOL[i])),
                nn.Dropout(cfg.baseline_dropout),
            )
            for i in range(len(TIME_POOL))
        )
        n_freq = n_mels
        for p in FREQ_POOL:
            n_freq //= p
        self.gru = nn.GRU(filters * n_freq, hidden, num_layers=cfg.baseline_n_rnn_layers, batch_first=True,
                          dropout=cfg.baseline_dropout, bidirectional=True)
        self.mhsa = nn.ModuleList(
            nn.MultiheadAttention(hidden, cfg.baseline_n_heads, dropout=cfg.baseline_dropout, batch_first=True)
            for _ in range(cfg.baseline_n_mhsa_layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(cfg.baseline_n_mhsa_layers))
        self.fc = nn.Linear(hidden, hidden)
        self.n_tracks = cfg.n_tracks
        self.out = nn.Linear(hidden, self.n_tracks * 3 * N_CLASSES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, 2, 251, 64) -> multi-ACCDOA (B, 50, 3, 13, 3)."""
        if self.cfg.input_mode == "mono":
            features = features.mean(dim=1, keepdim=True).expand(-1, 2, -1, -1)
        x = features
        for block in self.conv:
            x = block(x)
        b, c, t, f = x.shape  # t = 50: max pooling by 5 drops feature frame 250
        x, _ = self.gru(x.permute(0, 2, 1, 3).reshape(b, t, c * f))
        x = torch.tanh(x)
        half = x.shape[-1] // 2
        x = x[..., half:] * x[..., :half]
        for attn, norm in zip(self.mhsa, self.norms, strict=True):
            y, _ = attn(x, x, x, need_weights=False)
            x = norm(x + y)
        raw = self.out(self.fc(x)).view(b, N_LABEL_FRAMES, self.n_tracks, 3, N_CLASSES).transpose(-1, -2)
        return torch.cat([torch.tanh(raw[..., :2]), torch.relu(raw[..., 2:])], dim=-1)
