"""FOA -> stereo (spec §4): gains of a plane wave, label rotation/folding, clip cutting, the CLI."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import soundfile as sf

from seld import labels
from seld.cli import main as cli_main
from seld.errors import DataError
from seld.stereo import PEAK_LIMIT, convert_foa, foa_to_stereo, rotate_labels

SR = 24_000
NAME = re.compile(r"fold(\d+)_room(\d+)_mix(\d{3})_deg(\d{3})_start(\d{4})$")


def _plane_wave(signal: np.ndarray, az_deg: float, el_deg: float) -> np.ndarray:
    """(4, n) ACN/SN3D W Y Z X of a plane wave."""
    az, el = np.deg2rad(az_deg), np.deg2rad(el_deg)
    return np.stack([signal, signal * np.sin(az) * np.cos(el), signal * np.sin(el),
                     signal * np.cos(az) * np.cos(el)])


@pytest.mark.parametrize("az,el,theta", [(30, 0, 0), (30, 20, 90), (-120, -35, 200), (170, 45, 359),
                                         (-90, 10, 45)])
def test_plane_wave_gains(az, el, theta):
    s = np.random.default_rng(0).standard_normal(1000)
    lr = foa_to_stereo(_plane_wave(s, az, el), theta)
    rot = np.deg2rad(az + theta)
    g = np.sin(rot) * np.cos(np.deg2rad(el))
    np.testing.assert_allclose(lr[0], s * (1 + g), atol=1e-5)
    np.testing.assert_allclose(lr[1], s * (1 - g), atol=1e-5)
    # The folded label describes the same gains: sin(folded) = sin(rotated).
    ev = labels.make_events([(0, 1, 0, az, el, 250)], labels.FOA_EVENT_DTYPE)
    out = rotate_labels(ev, theta)
    assert -90 <= out["azimuth"][0] <= 90
    assert np.sin(np.deg2rad(out["azimuth"][0])) == pytest.approx(np.sin(rot), abs=1e-9)
    assert out["distance"][0] == 250 and out["class"][0] == 1


def test_rotate_labels_fold_values():
    ev = labels.make_events([(0, 0, 0, a, 0, 100) for a in (0, 100, -100, 179, -180, 60)],
                            labels.FOA_EVENT_DTYPE)
    np.testing.assert_array_equal(rotate_labels(ev, 0)["azimuth"], [0, 80, -80, 1, 0, 60])
    np.testing.assert_array_equal(rotate_labels(ev, 45)["azimuth"], [45, 35, -55, -44, -45, 75])


def _make_foa_root(root, recordings):
    """recordings: list of (sub, stem, seconds, az, el, gain, events rows)."""
    for sub, stem, seconds, az, el, gain, rows in recordings:
        n = int(seconds * SR)
        s = gain * np.sin(2 * np.pi * 500 * np.arange(n) / SR)
        wav = root / "foa_dev" / sub / f"{stem}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        sf.write(wav, _plane_wave(s, az, el).T, SR, subtype="FLOAT")
        labels.write_foa_csv(root / "metadata_dev" / sub / f"{stem}.csv",
                             labels.make_events(rows, labels.FOA_EVENT_DTYPE))


def test_convert_clips_gains_labels_window(tmp_path, caplog):
    az, el = 40.0, 25.0
    rows = [(f, 3, 1, az, el, 180) for f in range(0, 120)]  # active over the whole 12-s recording
    rows += [(5, 7, 0, -150, 0, 300), (110, 8, 0, 100, 0, 90)]
    _make_foa_root(tmp_path / "foa", [
        ("dev-train-whatever", "fold1_room2_mix003", 12.0, az, el, 0.3, rows),
        ("other", "fold1_room9_mix001", 3.0, 0, 0, 0.3, [(0, 0, 0, 0, 0, 100)]),  # too short
    ])
    with caplog.at_level(logging.WARNING, logger="seld.stereo"):
        paths = convert_foa(tmp_path / "foa", tmp_path / "data", "dev-train-synth", 6, seed=1)
    assert "fold1_room9_mix001.wav" in caplog.text and "skipped" in caplog.text
    assert len(paths) == 6 and len({p.name for p in paths}) == 6
    n = 50 * 2400
    s = 0.3 * np.sin(2 * np.pi * 500 * np.arange(12 * SR) / SR)
    for p in paths:
        assert p.parent == tmp_path / "data" / "stereo_dev" / "dev-train-synth"
        fold, room, mix, deg, start = map(int, NAME.match(p.stem).groups())
        assert (fold, room, mix) == (1, 2, 3) and 0 <= deg < 360 and 0 <= start <= 70
        audio, sr = sf.read(p, always_2d=True)
        assert sr == SR and audio.shape == (n, 2) and sf.info(p).subtype == "PCM_16"
        g = np.sin(np.deg2rad(az + deg)) * np.cos(np.deg2rad(el))
        seg = s[start * 2400:start * 2400 + n]
        np.testing.assert_allclose(audio[:, 0], seg * (1 + g), atol=2e-4)
        np.testing.assert_allclose(audio[:, 1], seg * (1 - g), atol=2e-4)
        ev = labels.read_reference_csv(tmp_path / "data" / "metadata_dev" / "dev-train-synth" / f"{p.stem}.csv")
        main = ev[ev["class"] == 3]
        np.testing.assert_array_equal(main["frame"], np.arange(50))  # shifted, outside rows dropped
        assert np.all(main["azimuth"] == np.rint(labels.fold_azimuth(az + deg)))
        assert np.all(main["distance"] == 180) and np.all(main["source"] == 1)
        # One-frame events appear only when their frame falls in the clip window.
        assert (7 in ev["class"]) == (start <= 5 < start + 50)
        assert (8 in ev["class"]) == (start <= 110 < start + 50)
        if 7 in ev["class"]:
            assert ev[ev["class"] == 7]["frame"][0] == 5 - start


def test_convert_is_seeded(tmp_path):
    rows = [(f, 0, 0, 10, 0, 100) for f in range(0, 80)]
    _make_foa_root(tmp_path / "foa", [("a", "fold2_room1_mix001", 8.0, 10, 0, 0.2, rows),
                                      ("b", "fold2_room3_mix002", 9.0, -60, 5, 0.2, rows)])
    a = convert_foa(tmp_path / "foa", tmp_path / "d1", "dev-train-synth", 5, seed=7)
    b = convert_foa(tmp_path / "foa", tmp_path / "d2", "dev-train-synth", 5, seed=7)
    c = convert_foa(tmp_path / "foa", tmp_path / "d3", "dev-train-synth", 5, seed=8)
    assert [p.name for p in a] == [p.name for p in b] != [p.name for p in c]
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b, strict=True))
    assert {p.name[:18] for p in a} == {"fold2_room1_mix001", "fold2_room3_mix002"}  # both used


def test_peak_redraw(tmp_path):
    # A constant 0.6 from the left (φ = 90°): L = 0.6 (1 + cos θ) clips when cos θ > 0.6665.
    n = 10 * SR
    wav = tmp_path / "foa" / "foa_dev" / "s" / "fold1_room1_mix001.wav"
    wav.parent.mkdir(parents=True)
    sf.write(wav, _plane_wave(np.full(n, 0.6), 90, 0).T, SR, subtype="FLOAT")
    labels.write_foa_csv(tmp_path / "foa" / "metadata_dev" / "s" / "fold1_room1_mix001.csv",
                         labels.make_events([(0, 0, 0, 90, 0, 100)], labels.FOA_EVENT_DTYPE))
    paths = convert_foa(tmp_path / "foa", tmp_path / "d", "dev-train-synth", 20, seed=0)
    degs = np.array([int(NAME.match(p.stem).group(4)) for p in paths])
    assert np.all(0.6 * (1 + np.cos(np.deg2rad(degs))) <= PEAK_LIMIT)
    assert max(np.abs(sf.read(p)[0]).max() for p in paths) <= PEAK_LIMIT


def test_wav_without_csv_is_an_error(tmp_path):
    _make_foa_root(tmp_path / "foa", [("x", "fold1_room1_mix001", 6.0, 0, 0, 0.1, [])])
    lonely = tmp_path / "foa" / "foa_dev" / "x" / "fold1_room1_mix002.wav"
    sf.write(lonely, np.zeros((6 * SR, 4)), SR)
    with pytest.raises(DataError, match=r"fold1_room1_mix002\.wav.*expected .*metadata_dev/x/fold1_room1_mix002\.csv"):
        convert_foa(tmp_path / "foa", tmp_path / "d", "dev-train-synth", 2, seed=0)


def test_cli(tmp_path, capsys):
    rows = [(f, 2, 0, -30, 0, 150) for f in range(60)]
    _make_foa_root(tmp_path / "foa", [("dev-synth", "fold3_room4_mix010", 7.0, -30, 0, 0.2, rows)])
    rc = cli_main(["convert-foa", str(tmp_path / "foa"), "--out", str(tmp_path / "data"),
                   "--split", "dev-train-synth", "--clips", "3", "--seed", "2"])
    assert rc == 0
    wavs = sorted((tmp_path / "data" / "stereo_dev" / "dev-train-synth").glob("*.wav"))
    csvs = sorted((tmp_path / "data" / "metadata_dev" / "dev-train-synth").glob("*.csv"))
    assert len(wavs) == 3 and [w.stem for w in wavs] == [c.stem for c in csvs]
    rc = cli_main(["convert-foa", str(tmp_path / "nothing"), "--out", str(tmp_path / "d2"), "--clips", "1"])
    assert rc == 2 and "nothing" in capsys.readouterr().err
