"""Convolutional building blocks of Stereo-RCnet: MS-CAM, residual blocks, MCSAnet and AFF fusion.

Every block works on feature maps (N, C, T, F): T time frames (20 ms, 251 per clip, never pooled
here) and F frequency bins (64 mel at the input, pooled inside MCSAnet).
"""

from __future__ import annotations

import torch
from torch import nn


class MultiScaleChannelAttention(nn.Module):
    """MS-CAM (Dai et al., "Attentional feature fusion", WACV 2021, §3.2).

    Two 1x1-conv bottlenecks (C -> C/r -> C): a global branch on the average-pooled map and a local
    point-wise branch on every time-frequency bin; their sum through a sigmoid gives attention
    weights in (0, 1) of the input's shape. The global branch has no BatchNorm (a 1x1 map of one
    clip has no statistics to normalise; it keeps batch size 1 trainable).

    Args:
        channels: C. reduction: r (bottleneck width max(C // r, 1)).
    Shapes: (N, C, T, F) -> (N, C, T, F) weights in (0, 1).
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
        self.local_branch = nn.Sequential(
            nn.Conv2d(channels, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
            nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )
        self.global_branch = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, inner, 1), nn.ReLU(inplace=True),
            nn.Conv2d(inner, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.local_branch(x) + self.global_branch(x))


class ResidualBlock(nn.Module):
    """Basic ResNet block (He et al. 2016) with MS-CAM on the residual branch (MCSA, paper Fig. 1b).

    conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> (x attention weights) -> + shortcut -> ReLU; the
    shortcut is a 1x1 conv + BN when the width changes. Stride 1: time and frequency are kept.

    Shapes: (N, C_in, T, F) -> (N, C_out, T, F).
    """

    def __init__(self, in_channels: int, out_channels: int, attention: bool = True,
                 reduction: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.attention = MultiScaleChannelAttention(out_channels, reduction) if attention else None
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.attention is not None:
            out = out * self.attention(out)
        return torch.relu(out + self.shortcut(x))


class FreqAvgPool(nn.Module):
    """Average pooling over the last (frequency) axis by `size`, keeping time: nn.AvgPool2d((1, size)).

    Written as a reshape and a mean, which gives the same bits as AvgPool2d (forward and backward);
    the op alone is about 1.5x faster on CPU (no measurable gain in a whole training run). A trailing
    remainder of F % size bins is dropped, as AvgPool2d does.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1] // self.size
        return x[..., :n * self.size].unflatten(-1, (n, self.size)).mean(-1)


class MCSAnet(nn.Module):
    """The per-channel feature extractor of Stereo-RCnet (paper §2.2, Fig. 1a/b).

    A stem (conv3x3 -> BN -> ReLU, stride 1) then one residual stage per entry of `channels`, each
    followed by average pooling over frequency only (Niu et al. 2023: keep the time resolution), so
    all 251 frames survive. The stem's frequency pooling is `stem_freq_pool` (1 = none).

    Args:
        in_channels: 1 (one stereo channel; L and R share these weights) or 2 (early fusion).
        stem_channels: width of the stem conv.
        channels: output width of each residual stage. freq_pool: frequency pooling after each.
        attention: MS-CAM inside each residual block. reduction: MS-CAM bottleneck ratio.
    Shapes: (N, in_channels, T, F) -> (N, channels[-1], T, F // (stem_freq_pool * prod(freq_pool))).
    """

    def __init__(self, in_channels: int, stem_channels: int, channels: tuple[int, ...],
                 freq_pool: tuple[int, ...], stem_freq_pool: int = 1, attention: bool = True,
                 reduction: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True),
            FreqAvgPool(stem_freq_pool) if stem_freq_pool > 1 else nn.Identity(),
        )
        widths = (stem_channels, *channels)
        self.blocks = nn.ModuleList(
            ResidualBlock(widths[i], widths[i + 1], attention, reduction) for i in range(len(channels))
        )
        self.pools = nn.ModuleList(FreqAvgPool(p) if p > 1 else nn.Identity() for p in freq_pool)
        self.out_channels = channels[-1] if channels else stem_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block, pool in zip(self.blocks, self.pools, strict=True):
            x = pool(block(x))
        return x


class AttentionalFeatureFusion(nn.Module):
    """AFF (Dai et al. 2021, §3.3) as Stereo-RCnet uses it (paper eq. 1).

    w = 2 * MS-CAM(F_left + F_right) in (0, 2); F = w * F_left + (2 - w) * F_right. Equal inputs
    give F = 2 F_left for any w.

    Shapes: two (N, C, T, F) -> (N, C, T, F).
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.attention = MultiScaleChannelAttention(channels, reduction)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        w = 2.0 * self.attention(left + right)
        return w * left + (2.0 - w) * right
