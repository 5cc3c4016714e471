"""Row planning (validation rooms, split table), row decoding and normalisation of seld/data.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from seld import data
from seld.config import preset_config
from seld.errors import DataError


def _index() -> pd.DataFrame:
    rows = []
    for site, rooms, domain, role, split in (
        ("tau", (1, 2, 3), "real", "train", "dev-train-tau"),
        ("sony", (21, 22), "real", "train", "dev-train-sony"),
        ("tau", (4,), "real", "test", "dev-test-tau"),
        ("sony", (23,), "real", "test", "dev-test-sony"),
        ("synth", (100, 101), "synthetic", "train", "dev-train-synth"),
        ("synth", (102,), "synthetic", "test", "dev-test-synth"),
    ):
        for room in rooms:
            for k in range(3):
                rows.append({"clip": f"fold3_room{room}_mix{k:03d}", "split": split, "domain": domain,
                             "role": role, "site": site, "room": room})
    return pd.DataFrame(rows)


def test_default_validation_is_last_room_of_each_real_site():
    assert data.validation_rooms(_index(), preset_config("smoke").data) == {"sony": (22,), "tau": (3,)}


def test_plan_rows_follows_the_split_table():
    idx = _index()
    rows = data.plan_rows(idx, preset_config("smoke"))
    room = {c: r for c, r in zip(idx["clip"], idx["room"], strict=True)}
    assert sorted({room[c] for c in rows["val"]}) == [3, 22]
    assert sorted({room[c] for c in rows["stage2"]}) == [1, 2, 21]
    assert sorted({room[c] for c in rows["stage1"]}) == [1, 2, 21, 100, 101]
    assert sorted({room[c] for c in rows["test"]}) == [4, 23]
    assert sorted({room[c] for c in rows["synth_test"]}) == [102]
    # Validation never overlaps training or test, and lists are sorted (order-independent of Ray).
    assert not set(rows["val"]) & (set(rows["stage1"]) | set(rows["test"]))
    assert rows["stage1"] == sorted(rows["stage1"])


def test_plan_rows_options():
    idx = _index()
    cfg = preset_config("smoke", {"data.val_rooms": "2", "data.stage1_domains": "synthetic"})
    rows = data.plan_rows(idx, cfg)
    room = dict(zip(idx["clip"], idx["room"], strict=True))
    assert sorted({room[c] for c in rows["val"]}) == [2]
    assert sorted({room[c] for c in rows["stage1"]}) == [100, 101]
    paper = data.plan_rows(idx, preset_config("smoke", {"data.protocol": "paper"}))
    assert paper["val"] == paper["test"]
    assert sorted({room[c] for c in paper["stage2"]}) == [1, 2, 3, 21, 22]
    with pytest.raises(DataError, match="val_rooms"):
        data.plan_rows(idx, preset_config("smoke", {"data.val_rooms": "7"}))
    no_synth = idx[idx["domain"] == "real"]
    with pytest.raises(DataError, match="stage1"):
        data.plan_rows(no_synth, preset_config("smoke", {"data.stage1_domains": "synthetic"}))


def test_rows_to_arrays_and_targets():
    n_mels = 4
    feats = np.arange(2 * 2 * 251 * n_mels, dtype=np.float16).reshape(2, -1)
    batch = {"clip": np.array(["b", "a"]), "split": np.array(["s", "s"]), "domain": np.array(["real"] * 2),
             "features": feats,
             "ev_frame": np.array([np.array([0, 1]), np.array([], int)], dtype=object),
             "ev_class": np.array([np.array([3, 3]), np.array([], int)], dtype=object),
             "ev_source": np.array([np.array([0, 0]), np.array([], int)], dtype=object),
             "ev_azimuth": np.array([np.array([30.0, -90.0]), np.array([])], dtype=object),
             "ev_distance": np.array([np.array([150.0, 200.0]), np.array([])], dtype=object)}
    b = data.concat([data.to_clip_batch(batch)])
    assert list(b.clips) == ["a", "b"]  # sorted by clip
    assert b.features.shape == (2, 2, 251, n_mels) and b.features.dtype == np.float16
    assert len(b.events[0]) == 0 and list(b.events[1]["azimuth"]) == [30.0, -90.0]
    t = data.encode_targets(b.events, "accdoa")
    assert t.shape == (2, 50, 13, 4)
    np.testing.assert_allclose(t[1, 0, 3], [1, np.cos(np.pi / 6), np.sin(np.pi / 6), 1.5], atol=1e-6)
    np.testing.assert_allclose(t[1, 1, 3], [1, 0, -1, 2.0], atol=1e-6)
    assert data.encode_targets(b.events, "multi_accdoa").shape == (2, 50, 6, 13, 4)


def test_normalisation_from_sums_of_shards_equals_the_whole():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(10, 2, 251, 8)).astype(np.float16)
    whole = data.norm_from_sums(data.feature_sums(x))
    parts = data.norm_from_sums(data.feature_sums(x[:4]) + data.feature_sums(x[4:]))
    np.testing.assert_allclose(whole[0], parts[0], rtol=1e-6)
    np.testing.assert_allclose(whole[1], parts[1], rtol=1e-6)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(whole[0][:, 0], x64.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(whole[1][:, 0], x64.std(axis=(0, 2)), rtol=1e-4)
    assert whole[0].shape == (2, 1, 8) and whole[0].dtype == np.float32
