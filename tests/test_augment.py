"""Batch augmentations (seld/augment.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from seld.augment import Augmenter, cutout, frequency_shift, spec_augment, swap_channels
from seld.config import AugmentConfig
from seld.labels import decode_accdoa, encode_accdoa, encode_multi_accdoa, make_events

OFF = AugmentConfig().disabled()


def _batch(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 2, 251, 64, generator=g) * 10 - 30
    ev = make_events([(0, 1, 0, 30.0, 200.0, 0), (5, 4, 0, -60.0, 300.0, 0), (9, 8, 0, 80.0, 120.0, 0)])
    t = torch.from_numpy(np.stack([encode_accdoa(ev)[0]] * b))
    return x, t, ev


def test_swap_twice_is_identity_and_negates_decoded_azimuth():
    x, t, ev = _batch()
    apply = torch.tensor([True, False, True, True, False, True])
    x1, t1 = swap_channels(x, t, apply)
    assert torch.equal(x1[0, 0], x[0, 1]) and torch.equal(x1[1], x[1])
    x2, t2 = swap_channels(x1, t1, apply)
    assert torch.equal(x2, x) and torch.equal(t2, t)
    out = torch.cat([t1[..., 1:3], t1[..., 3:4]], dim=-1)
    decoded = decode_accdoa(out[0], 0.5)
    np.testing.assert_allclose(np.sort(decoded["azimuth"]), np.sort(-ev["azimuth"]), atol=1e-4)
    np.testing.assert_allclose(np.sort(decode_accdoa(out[1], 0.5)["azimuth"]), np.sort(ev["azimuth"]), atol=1e-4)


def test_swap_negates_multi_accdoa_y():
    _, _, ev = _batch()
    t = torch.from_numpy(encode_multi_accdoa(ev)[0])[None]
    _, t1 = swap_channels(torch.zeros(1, 2, 251, 64), t, torch.tensor([True]))
    assert torch.equal(t1[..., 2], -t[..., 2]) and torch.equal(t1[..., [0, 1, 3]], t[..., [0, 1, 3]])


@pytest.mark.parametrize("name", ["cutout", "specaug", "shift", "augmix"])
def test_masks_never_touch_targets_and_change_features(name):
    x, t, _ = _batch()
    cfg = dataclasses.replace(OFF, **{{"cutout": "cutout_p", "specaug": "specaug_p", "shift": "freq_shift_p",
                                        "augmix": "augmix_p"}[name]: 1.0}, specaug_max_time=40, specaug_max_freq=16)
    x1, t1 = Augmenter(cfg)(x.clone(), t.clone(), torch.Generator().manual_seed(1))
    assert torch.equal(t1, t)
    assert x1.shape == x.shape and not torch.equal(x1, x)
    assert torch.equal(x1[:, 0] - x[:, 0] != 0, x1[:, 1] - x[:, 1] != 0) or name in ("shift", "augmix")


def test_augmix_stays_within_input_range():
    x, t, _ = _batch(8, seed=3)
    cfg = dataclasses.replace(OFF, augmix_p=1.0, augmix_width=4, augmix_depth=3)
    x1, _ = Augmenter(cfg)(x, t, torch.Generator().manual_seed(2))
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    assert torch.all(x1 >= lo - 1e-4) and torch.all(x1 <= hi + 1e-4)
    assert not torch.equal(x1, x)


def test_ops_respect_selection_and_strength():
    x, _, _ = _batch(4)
    g = torch.Generator().manual_seed(0)
    sel = torch.tensor([True, False, True, False])
    for out in (cutout(x, sel, 0.25, g), spec_augment(x, sel, 25, 8, g), frequency_shift(x, sel, 4, g)):
        assert torch.equal(out[~sel], x[~sel])
    out = cutout(x, torch.ones(4, dtype=torch.bool), 0.25, g)
    changed = (out != x)[:, 0]
    assert changed.any(dim=2).sum(dim=1).max() <= int(0.25 * 251)
    assert changed.any(dim=1).sum(dim=1).max() <= int(0.25 * 64)
    shifted = frequency_shift(x, torch.ones(4, dtype=torch.bool), 3, g)
    for i in range(4):  # a pure shift: some roll by -3..3 bins matches the middle bins
        assert any(torch.equal(shifted[i, :, :, 8:56], x[i, :, :, 8 - s:56 - s]) for s in range(-3, 4))


def test_same_seed_same_batch_and_disabled_is_identity():
    x, t, _ = _batch()
    cfg = AugmentConfig(swap_p=0.5)
    a = Augmenter(cfg)(x, t, torch.Generator().manual_seed(5))
    b = Augmenter(cfg)(x, t, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    same = Augmenter(OFF)(x, t, torch.Generator().manual_seed(5))
    assert same[0] is x and same[1] is t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_batch_device():
    x, t, _ = _batch()
    x1, t1 = Augmenter(AugmentConfig(swap_p=0.5, augmix_p=0.5))(x.cuda(), t.cuda(), torch.Generator().manual_seed(0))
    assert x1.is_cuda and t1.is_cuda
