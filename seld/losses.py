"""Training losses: Stereo-RCnet's MSE + MSPE on ACCDOA (paper eqs. 4-6) and the baseline's ADPIT.

Reads model outputs (see seld.model) and targets stacked from `labels.encode_accdoa`
(B, 50, 13, 4) or `labels.encode_multi_accdoa` (B, 50, 6, 13, 4), channels
[activity, activity*x, activity*y, distance_m]; writes a scalar loss.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from seld.config import LossConfig

# Slots of the ADPIT target (labels.encode_multi_accdoa): one event -> A0, two -> B0 B1, three -> C0 C1 C2.
ADPIT_GROUPS: tuple[tuple[int, ...], ...] = ((0,), (1, 2), (3, 4, 5))


def adpit_permutations(n_tracks: int = 3) -> tuple[list[torch.Tensor], list[int]]:
    """Auxiliary duplicating permutations (Shimada et al., ICASSP 2022) for `n_tracks` tracks.

    For a group of k same-class events, every assignment of the n_tracks output tracks to the k
    event slots that uses each slot at least once (a surjection; duplicates allowed). For 3 tracks:
    1 (A0A0A0) + 6 (B) + 6 (C) = 13.

    Returns:
        (list of int64 (n_tracks,) slot indices, one per permutation; the group index of each).
    """
    perms, groups = [], []
    for g, slots in enumerate(ADPIT_GROUPS[:n_tracks]):
        for assign in itertools.product(slots, repeat=n_tracks):
            if set(assign) == set(slots):
                perms.append(torch.tensor(assign))
                groups.append(g)
    return perms, groups


class AccdoaLoss(nn.Module):
    """L = alpha * L_DOA + beta * L_dist (paper eqs. 4-6), averaged over the batch.

    L_DOA = 1/(C T) sum_{c,t} ||R_ct - R^_ct||^2 with R = activity * (x, y) (2-D);
    L_dist = 1/(C T) sum_{c,t} (a_ct (d_ct - d^_ct) / d_ct)^2.
    Both divide by all C*T class-frames, as the equations write it (dividing the distance term by
    the active class-frames only makes it ~10x the direction term and a small model then learns
    to predict nothing; ../shared/notes/learnability.md). Inactive cells divide by 1, not 0.

    Shapes: output (B, T, C, 3) = (x, y, distance_m); target (B, T, C, 4) -> scalar.
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or LossConfig()
        self.alpha, self.beta = cfg.alpha, cfg.beta

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.doa_loss(output, target) + self.beta * self.distance_loss(output, target)

    @staticmethod
    def doa_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Eq. 4, mean over batch of sum over (t, c) divided by C*T."""
        return (output[..., :2] - target[..., 1:3]).square().sum(dim=-1).mean()

    @staticmethod
    def distance_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Eq. 5, mean over batch of sum over (t, c) divided by C*T."""
        active = target[..., 0]
        ref = target[..., 3]
        safe_ref = torch.where(active > 0, ref, torch.ones_like(ref)).clamp_min(1e-3)
        return (active * (ref - output[..., 2]) / safe_ref).square().mean()


class AdpitLoss(nn.Module):
    """Multi-ACCDOA loss with auxiliary duplicating PIT (official baseline, spec §7).

    Each slot's target is (activity*x, activity*y, activity*distance_m). For each permutation of a
    group, the other groups are padded with their first permutation (as the official loss does, so
    a permutation of an empty group is never free). MSE over tracks and coordinates per
    (batch, frame, class), the lowest-loss permutation is chosen there, then averaged.

    Shapes: output (B, T, n_tracks, C, 3); target (B, T, 6, C, 4) -> scalar.
    """

    def __init__(self, n_tracks: int = 3) -> None:
        super().__init__()
        perms, groups = adpit_permutations(n_tracks)
        first = {}
        for p, g in zip(perms, groups, strict=True):
            first.setdefault(g, p)
        self.register_buffer("perms", torch.stack(perms), persistent=False)  # (P, n_tracks)
        self.register_buffer("groups", torch.tensor(groups), persistent=False)  # (P,)
        self.register_buffer("first", torch.stack([first[g] for g in sorted(first)]), persistent=False)

    @property
    def n_permutations(self) -> int:
        return self.perms.shape[0]

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        slots = torch.cat([target[..., 1:3], target[..., 0:1] * target[..., 3:4]], dim=-1)  # (B,T,6,C,3)
        canonical = slots[:, :, self.first]  # (B, T, G, n_tracks, C, 3): each group's first permutation
        pad = canonical.sum(dim=2, keepdim=True) - canonical  # the other groups, per group
        candidates = slots[:, :, self.perms] + pad[:, :, self.groups]  # (B, T, P, n_tracks, C, 3)
        err = (output.unsqueeze(2) - candidates).square().mean(dim=(3, 5))  # (B, T, P, C)
        return err.min(dim=2).values.mean()


def build_loss(loss_cfg: LossConfig, output_format: str, n_tracks: int = 3) -> nn.Module:
    """`AccdoaLoss` for "accdoa", `AdpitLoss` for "multi_accdoa"; call as loss(output, target)."""
    if output_format == "accdoa":
        return AccdoaLoss(loss_cfg)
    if output_format == "multi_accdoa":
        return AdpitLoss(n_tracks)
    raise ValueError(f"unknown output_format {output_format!r}; use accdoa or multi_accdoa")
