"""Batch augmentations on log-mel features (paper §2.4) and the stereo left/right swap.

Reads a batch of features (B, 2, T, F) and its targets (ACCDOA (B, 50, 13, 4) or multi-ACCDOA
(B, 50, 6, 13, 4), channels [activity, activity*x, activity*y, distance_m]) on any device; writes
both, augmented per clip. Only the swap changes geometry, so only the swap touches the targets.
Random numbers come from a CPU `torch.Generator`, so a seed gives the same batch on CPU and GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from seld.config import AugmentConfig


def _uniform(n: int, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=gen)


def _randint(low: int, high: torch.Tensor | int, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """Per-clip integers in [low, high] (inclusive; high may be a tensor of n bounds)."""
    high = torch.as_tensor(high, dtype=torch.float32).expand(n)
    return (low + torch.rand(n, generator=gen) * (high - low + 1)).floor().long()


def _band_mask(start: torch.Tensor, width: torch.Tensor, size: int, device) -> torch.Tensor:
    """(n, size) bool: True where start <= i < start + width."""
    i = torch.arange(size, device=device)
    start, width = start.to(device)[:, None], width.to(device)[:, None]
    return (i >= start) & (i < start + width)


def _fill_value(x: torch.Tensor) -> torch.Tensor:
    """Per-clip mean (n, 1, 1, 1): a masked region becomes the clip's average level."""
    return x.mean(dim=(1, 2, 3), keepdim=True)


def cutout(x: torch.Tensor, apply: torch.Tensor, max_frac: float, gen: torch.Generator | None) -> torch.Tensor:
    """Random erasing (Zhong et al., AAAI 2020): one time-frequency rectangle per selected clip,
    the same on both channels, filled with the clip's mean. x (n, 2, T, F); apply (n,) bool."""
    n, _, t, f = x.shape
    ht = _randint(1, max(1, int(max_frac * t)), n, gen)
    hf = _randint(1, max(1, int(max_frac * f)), n, gen)
    t0 = _randint(0, t - ht, n, gen)
    f0 = _randint(0, f - hf, n, gen)
    mask = _band_mask(t0, ht, t, x.device)[:, :, None] & _band_mask(f0, hf, f, x.device)[:, None, :]
    mask &= apply.to(x.device)[:, None, None]
    return torch.where(mask[:, None], _fill_value(x), x)


def spec_augment(x: torch.Tensor, apply: torch.Tensor, max_time: int, max_freq: int,
                 gen: torch.Generator | None) -> torch.Tensor:
    """Time and frequency masking (SpecAugment, Park et al., Interspeech 2019): one time band of
    0..max_time frames and one mel band of 0..max_freq bins per selected clip, both channels."""
    n, _, t, f = x.shape
    wt = _randint(0, min(max_time, t), n, gen)
    wf = _randint(0, min(max_freq, f), n, gen)
    t0 = _randint(0, t - wt, n, gen)
    f0 = _randint(0, f - wf, n, gen)
    mask = _band_mask(t0, wt, t, x.device)[:, :, None] | _band_mask(f0, wf, f, x.device)[:, None, :]
    mask &= apply.to(x.device)[:, None, None]
    return torch.where(mask[:, None], _fill_value(x), x)


def frequency_shift(x: torch.Tensor, apply: torch.Tensor, max_shift: int, gen: torch.Generator | None) -> torch.Tensor:
    """Shift along mel bins by -max_shift..max_shift (SALSA, Nguyen et al. 2022), edge bins repeated
    into the vacated side, both channels alike."""
    n, _, t, f = x.shape
    shift = _randint(-max_shift, max_shift, n, gen) * apply.long()
    src = (torch.arange(f)[None, :] - shift[:, None]).clamp(0, f - 1).to(x.device)  # (n, F)
    return torch.gather(x, 3, src[:, None, None, :].expand(n, x.shape[1], t, f))


def swap_channels(x: torch.Tensor, targets: torch.Tensor, apply: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left/right swap: mirrors the scene about the front axis, so azimuth -> -azimuth and the
    targets' y (channel 2) is negated. x (B, 2, T, F); targets (B, ..., 4); apply (B,) bool."""
    sel = apply.to(x.device)
    x = torch.where(sel[:, None, None, None], x.flip(1), x)
    sign = torch.ones(targets.shape[-1], device=targets.device)
    sign[2] = -1.0
    flip = sel.to(targets.device).view(-1, *([1] * (targets.dim() - 1)))
    return x, torch.where(flip, targets * sign, targets)


class Augmenter:
    """All batch augmentations with the probabilities and strengths of an AugmentConfig.

    Each clip independently: stereo swap (swap_p); then either AugMix (augmix_p; Hendrycks et al.
    2020: augmix_width chains of 1..augmix_depth random ops among cutout/SpecAugment/shift, mixed
    with Dirichlet(alpha) weights and blended with the clip by a Beta(alpha, alpha) weight) or the
    single ops, each with its own probability. Every op fills or shifts with values of the clip
    itself, so AugMix output stays within the clip's input range.

    Call: features (B, 2, T, F), targets (B, ..., 4), generator (CPU torch.Generator or None)
    -> (features, targets) on the input's device.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    @property
    def enabled(self) -> bool:
        c = self.cfg
        return any(p > 0 for p in (c.cutout_p, c.specaug_p, c.freq_shift_p, c.augmix_p, c.swap_p))

    def _op(self, k: int, x: torch.Tensor, apply: torch.Tensor, gen) -> torch.Tensor:
        c = self.cfg
        if k == 0:
            return cutout(x, apply, c.cutout_max_frac, gen)
        if k == 1:
            return spec_augment(x, apply, c.specaug_max_time, c.specaug_max_freq, gen)
        return frequency_shift(x, apply, c.freq_shift_max, gen)

    def augmix(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """AugMix of every clip of x (n, 2, T, F)."""
        c = self.cfg
        n = x.shape[0]
        always = torch.ones(n, dtype=torch.bool)
        # Dirichlet and Beta draws take no torch generator: a numpy one seeded from it keeps runs
        # reproducible.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        weights = torch.from_numpy(rng.dirichlet([c.augmix_alpha] * c.augmix_width, size=n)).float()
        blend = torch.from_numpy(rng.beta(c.augmix_alpha, c.augmix_alpha, size=n)).float()
        mix = torch.zeros_like(x)
        for w in range(c.augmix_width):
            chain = x
            depth = int(torch.randint(1, c.augmix_depth + 1, (1,), generator=gen))
            for _ in range(depth):
                chain = self._op(int(torch.randint(0, 3, (1,), generator=gen)), chain, always, gen)
            mix = mix + weights[:, w].to(x.device).view(n, 1, 1, 1) * chain
        m = blend.to(x.device).view(n, 1, 1, 1)
        return m * x + (1 - m) * mix

    def __call__(self, features: torch.Tensor, targets: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c, gen = self.cfg, generator
        b = features.shape[0]
        if not self.enabled:
            return features, targets
        x = features
        if c.swap_p > 0:
            x, targets = swap_channels(x, targets, _uniform(b, gen) < c.swap_p)
        use_mix = _uniform(b, gen) < c.augmix_p
        single = ~use_mix
        for k, p in enumerate((c.cutout_p, c.specaug_p, c.freq_shift_p)):
            if p > 0:
                x = self._op(k, x, single & (_uniform(b, gen) < p), gen)
        if use_mix.any():
            idx = use_mix.nonzero().squeeze(1).to(x.device)
            x = x.index_copy(0, idx, self.augmix(x.index_select(0, idx), gen))
        return x, targets

