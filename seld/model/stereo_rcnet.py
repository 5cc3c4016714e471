"""Stereo-RCnet (Wu & Zhu, DCASE 2025 tech. report, §2.2): MCSAnet per channel, AFF fusion,
embedding + T-Encoding, Conformer stack, T-Pooling 251 -> 50 frames, FC -> ACCDOA with distance.

Reads log-mel (B, 2, 251, 64) (20 ms frames); writes ACCDOA (B, 50, 13, 3) or multi-ACCDOA
(B, 50, 3, 13, 3) at the label rate (100 ms): x, y in [-1, 1] (tanh), distance in metres >= 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seld.config import FEATURE_FRAMES_PER_LABEL, N_CLASSES, N_LABEL_FRAMES, ModelConfig
from seld.model.blocks import AttentionalFeatureFusion, MCSAnet
from seld.model.conformer import ConformerBlock, sinusoidal_encoding


def pool_to_label_frames(x: torch.Tensor, n_label_frames: int = N_LABEL_FRAMES) -> torch.Tensor:
    """T-Pooling by the project's alignment rule: label frame f is the mean of feature frames
    5f .. 5f+4; feature frames from 5 * n_label_frames on (frame 250 of a clip) are dropped.

    Shapes: (B, T >= 5 * n_label_frames, d) -> (B, n_label_frames, d).
    """
    b, _, d = x.shape
    n = n_label_frames * FEATURE_FRAMES_PER_LABEL
    return x[:, :n].reshape(b, n_label_frames, FEATURE_FRAMES_PER_LABEL, d).mean(dim=2)


def accdoa_activation(raw: torch.Tensor) -> torch.Tensor:
    """(..., 3) raw head outputs -> (x, y) through tanh, distance (m) through softplus (>= 0,
    and unlike ReLU never stuck at zero for a class)."""
    return torch.cat([torch.tanh(raw[..., :2]), F.softplus(raw[..., 2:])], dim=-1)


class StereoRCnet(nn.Module):
    """The full model; every ablation of the paper is a field of :class:`ModelConfig`.

    fusion: "aff" (paper eq. 1), "add" (F_L + F_R), "concat" (channel concatenation) or "early"
    (one MCSAnet on the 2-channel input). input_mode "mono" replaces both channels by their mean
    before anything else, to measure how much the model owes to spatial cues.
    """

    def __init__(self, cfg: ModelConfig, n_mels: int = 64, n_frames: int = 251) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = MCSAnet(
            in_channels=2 if cfg.fusion == "early" else 1, stem_channels=cfg.stem_channels,
            channels=cfg.resnet_channels, freq_pool=cfg.freq_pool, stem_freq_pool=cfg.stem_freq_pool,
            attention=cfg.channel_attention, reduction=cfg.attention_reduction,
        )
        n_freq = n_mels // cfg.stem_freq_pool
        for p in cfg.freq_pool:
            n_freq //= p
        if n_freq < 1:
            raise ValueError(f"model.freq_pool pools {n_mels} mel bins below 1")
        channels = self.backbone.out_channels * (2 if cfg.fusion == "concat" else 1)
        self.fusion = AttentionalFeatureFusion(channels, cfg.attention_reduction) if cfg.fusion == "aff" else None
        self.embed = nn.Linear(channels * n_freq, cfg.d_model)
        self.register_buffer("encoding", sinusoidal_encoding(n_frames, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conformer = nn.ModuleList(
            ConformerBlock(cfg.d_model, cfg.n_heads, cfg.conformer_kernel, cfg.ff_mult, cfg.dropout)
            for _ in range(cfg.n_conformer_layers)
        )
        self.n_tracks = cfg.n_tracks if cfg.output_format == "multi_accdoa" else 1
        self.head = nn.Linear(cfg.d_model, self.n_tracks * N_CLASSES * 3)

    def extract(self, features: torch.Tensor) -> torch.Tensor:
        """MCSAnet + fusion. (B, 2, T, F) -> (B, C', T, F') with C' = 2C for concat."""
        if self.cfg.input_mode == "mono":
            features = features.mean(dim=1, keepdim=True).expand(-1, 2, -1, -1)
        if self.cfg.fusion == "early":
            return self.backbone(features)
        b = features.shape[0]
        # Left and right through the shared weights in one call: (2B, 1, T, F).
        both = self.backbone(features.transpose(0, 1).reshape(2 * b, 1, *features.shape[2:]))
        left, right = both[:b], both[b:]
        if self.cfg.fusion == "aff":
            return self.fusion(left, right)
        if self.cfg.fusion == "add":
            return left + right
        return torch.cat([left, right], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, 2, 251, 64) log-mel -> (B, 50, 13, 3) or (B, 50, n_tracks, 13, 3)."""
        fused = self.extract(features)
        b, c, t, f = fused.shape
        h = self.embed(fused.permute(0, 2, 1, 3).reshape(b, t, c * f))
        if self.cfg.conformer_rate == "label":
            # Cheaper variant (not the paper's): T-Pooling before the Conformer, which then runs on
            # 50 label frames instead of 251 feature frames (attention cost / 25, the rest / 5).
            h = pool_to_label_frames(h)
        if self.cfg.temporal_encoding:
            h = h + self.encoding[: h.shape[1]]
        h = self.dropout(h)
        for layer in self.conformer:
            h = layer(h)
        if self.cfg.conformer_rate == "feature":
            h = pool_to_label_frames(h)
        raw = self.head(h)
        if self.n_tracks == 1:
            return accdoa_activation(raw.view(b, N_LABEL_FRAMES, N_CLASSES, 3))
        return accdoa_activation(raw.view(b, N_LABEL_FRAMES, self.n_tracks, N_CLASSES, 3))
