"""Losses (seld/losses.py): ACCDOA MSE + MSPE with the paper's normalisation, and ADPIT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seld.config import N_CLASSES, LossConfig
from seld.labels import encode_accdoa, encode_multi_accdoa, make_events
from seld.losses import AccdoaLoss, AdpitLoss, adpit_permutations, build_loss


def _events():
    return make_events([(0, 0, 0, 30.0, 200.0, 0), (1, 0, 0, 30.0, 200.0, 0),
                        (1, 3, 0, -45.0, 150.0, 0), (2, 3, 1, 60.0, 300.0, 0), (2, 3, 2, -10.0, 100.0, 0),
                        (4, 5, 0, 10.0, 120.0, 0), (4, 5, 1, 50.0, 220.0, 0), (4, 5, 2, -70.0, 400.0, 0)])


def _perfect_accdoa(target: torch.Tensor) -> torch.Tensor:
    return torch.cat([target[..., 1:3], target[..., 3:4]], dim=-1)


def test_accdoa_loss_zero_for_perfect_prediction():
    target = torch.from_numpy(encode_accdoa(_events())[0])[None]
    assert AccdoaLoss()(_perfect_accdoa(target), target).item() == pytest.approx(0.0, abs=1e-7)


def test_accdoa_loss_normalised_by_all_class_frames():
    """Pins eqs. 4-5: both terms divide by C*T (all class-frames), not by active ones."""
    n_frames = 10
    ev = make_events([(3, 2, 0, 0.0, 200.0, 0)])  # one active class-frame, x = 1, y = 0, 2 m
    target = torch.from_numpy(encode_accdoa(ev, n_frames)[0])[None]
    out = _perfect_accdoa(target)
    out[0, 3, 2, 0] = 0.0  # direction error ||(1, 0)||^2 = 1 on the active cell
    out[0, 3, 2, 2] = 1.0  # distance 1 m instead of 2 m: squared percentage error 0.25
    out[0, 7, 9, 2] = 5.0  # a distance on an inactive cell costs nothing
    ct = N_CLASSES * n_frames
    loss = AccdoaLoss(LossConfig(alpha=1.0, beta=2.0))
    assert loss.doa_loss(out, target).item() == pytest.approx(1.0 / ct)
    assert loss.distance_loss(out, target).item() == pytest.approx(0.25 / ct)
    assert loss(out, target).item() == pytest.approx((1.0 + 2.0 * 0.25) / ct)


def test_exactly_13_adpit_permutations_all_distinct():
    perms, groups = adpit_permutations(3)
    assert len(perms) == 13
    assert len({tuple(p.tolist()) for p in perms}) == 13
    assert groups.count(0) == 1 and groups.count(1) == 6 and groups.count(2) == 6
    assert AdpitLoss().n_permutations == 13


def _perfect_multi(target: torch.Tensor) -> torch.Tensor:
    """Tracks that reproduce the slots: A0 on all tracks, or B0 B0 B1, or C0 C1 C2."""
    t = target[0]  # (T, 6, C, 4)
    vec = torch.cat([t[..., 1:3], t[..., 0:1] * t[..., 3:4]], dim=-1)
    return (vec[:, [0, 0, 0]] + vec[:, [1, 1, 2]] + vec[:, [3, 4, 5]])[None]


def test_adpit_zero_for_perfect_prediction_and_invariant_to_track_order():
    target = torch.from_numpy(encode_multi_accdoa(_events())[0])[None]
    out = _perfect_multi(target)
    loss = AdpitLoss()
    assert loss(out, target).item() == pytest.approx(0.0, abs=1e-7)
    # Permuting the tracks of duplicated same-class events changes nothing.
    for order in ([2, 0, 1], [1, 2, 0], [0, 2, 1]):
        assert loss(out[:, :, order], target).item() == pytest.approx(0.0, abs=1e-7)
    # Permuting the slots of a same-class group in the target changes nothing either.
    swapped = target.clone()
    swapped[:, :, [3, 4, 5]] = target[:, :, [5, 3, 4]]
    swapped[:, :, [1, 2]] = target[:, :, [2, 1]]
    assert loss(out, swapped).item() == pytest.approx(0.0, abs=1e-7)
    wrong = out.clone()
    wrong[0, 2, :, 3, 0] += 0.5
    assert loss(wrong, target).item() > 1e-4


def test_finite_gradients_with_all_inactive_targets():
    for fmt, shape, tshape in (("accdoa", (2, 50, 13, 3), (2, 50, 13, 4)),
                               ("multi_accdoa", (2, 50, 3, 13, 3), (2, 50, 6, 13, 4))):
        out = torch.randn(shape, requires_grad=True)
        loss = build_loss(LossConfig(), fmt)(out, torch.zeros(tshape))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(out.grad).all()


def test_build_loss_rejects_unknown_format():
    with pytest.raises(ValueError, match="output_format"):
        build_loss(LossConfig(), "sed")


def test_losses_match_numpy_reference_on_random_batch():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(np.stack([encode_accdoa(_events())[0]] * 3))
    out = torch.from_numpy(rng.normal(size=(3, 50, 13, 3)).astype(np.float32))
    t, o = target.numpy(), out.numpy()
    doa = ((o[..., :2] - t[..., 1:3]) ** 2).sum(-1).mean()
    d_ref = np.where(t[..., 0] > 0, t[..., 3], 1.0)
    dist = ((t[..., 0] * (t[..., 3] - o[..., 2]) / d_ref) ** 2).mean()
    assert AccdoaLoss()(out, target).item() == pytest.approx(doa + 2 * dist, rel=1e-5)
