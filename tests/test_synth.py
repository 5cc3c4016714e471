"""Generated dataset (seld/synth): physics of the FOA rendering, labels vs audio, layout, determinism,
reuse/resume and config errors."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from seld.config import N_CLASSES, SPLITS, ConfigError, SynthConfig, apply_overrides, preset_config
from seld.labels import read_foa_csv, read_reference_csv
from seld.stereo import foa_to_stereo
from seld.synth import (
    domain_spec,
    generate_dataset,
    make_room,
    plan_splits,
    plan_task,
    recording_tasks,
    render_task,
    rooms,
    scenes,
)
from seld.synth.sounds import synthesize_event

SR = 24_000
ANECHOIC = rooms.Room(room_id=1, size_m=(30.0, 30.0, 30.0), rt60_s=0.0, mic_m=(15.0, 15.0, 15.0))
TYPICAL = rooms.Room(room_id=2, size_m=(8.0, 6.0, 3.2), rt60_s=0.5, mic_m=(3.5, 2.8, 1.5), tail_seed=7)

# A tiny dataset: every split, 1-2 rooms, 5-s recordings (one clip each).
TINY = dict(n_synth_train=2, n_synth_test=1, n_real_train=4, n_real_test=2, recording_s=5.0,
            n_synth_train_rooms=1, n_synth_test_rooms=1, n_real_train_rooms_per_site=2,
            n_real_test_rooms_per_site=1)


def _static_event(cls=3, az=0.0, el=0.0, dist=1.0, n_frames=10, speed=0.0, seed=1):
    return scenes.Event(cls=cls, onset_frame=0, n_frames=n_frames, source=0, azimuth_deg=az,
                        elevation_deg=el, distance_m=dist, speed_deg_s=speed, level_db=0.0, seed=seed)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".wav", ".csv")}


# --- Physics -----------------------------------------------------------------------------------
@pytest.mark.parametrize("az", [-80.0, -45.0, -10.0, 0.0, 30.0, 60.0, 85.0])
def test_anechoic_plane_wave_gives_the_cardioid_lr_energy_ratio(az):
    """L/R energy ratio of a far source at elevation 0 is (1 + sin φ)² / (1 − sin φ)² within 0.05 dB."""
    foa = scenes.render_event(_static_event(cls=5, az=az, dist=10.0), ANECHOIC, rooms.late_tail(ANECHOIC))
    left, right = foa_to_stereo(foa, 0.0).astype(np.float64)
    measured_db = 10 * np.log10(np.sum(left**2) / np.sum(right**2))
    s = np.sin(np.deg2rad(az))
    expected_db = 20 * np.log10((1 + s) / (1 - s))
    assert measured_db == pytest.approx(expected_db, abs=0.05)


def test_direct_path_arrives_later_and_weaker_with_distance():
    peaks = []
    for dist in (0.5, 1.0, 2.0, 4.0):
        h = rooms.early_rir(ANECHOIC, 20.0, 10.0, dist)
        arrival = np.sum(np.arange(h.shape[1]) * h[0]) / np.sum(h[0])  # centroid of the two taps
        assert arrival == pytest.approx(dist / rooms.SPEED_OF_SOUND_M_S * SR, abs=0.01)
        assert h[0].sum() == pytest.approx(1.0 / dist, rel=1e-9)  # 1/r amplitude
        # direction: the intensity vector (X, Y) points to the source
        assert np.rad2deg(np.arctan2(h[1].sum(), h[3].sum())) == pytest.approx(20.0, abs=1e-6)
        peaks.append((arrival, h[0].sum()))
    assert all(a1 < a2 and g1 > g2 for (a1, g1), (a2, g2) in zip(peaks, peaks[1:], strict=False))


def test_late_tail_has_diffuse_channel_energies_and_the_room_rt60():
    tail = rooms.late_tail(TYPICAL)
    energy = np.sum(tail**2, axis=1)
    assert energy[1:] / energy[0] == pytest.approx([1 / 3] * 3, abs=0.05)  # X, Y, Z ~ W / 3 (SN3D)
    # Decay: fit the energy envelope after the fade-in; -60 dB after RT60.
    t = np.arange(tail.shape[1]) / SR
    win = int(0.02 * SR)
    e = np.add.reduceat(tail[0] ** 2, np.arange(0, tail.shape[1] - win, win))[:-1]
    tc = t[np.arange(0, tail.shape[1] - win, win)][:-1] + 0.01
    keep = tc > rooms.EARLY_S + 0.01
    slope_db_per_s = np.polyfit(tc[keep], 10 * np.log10(e[keep]), 1)[0]
    assert -60.0 / slope_db_per_s == pytest.approx(TYPICAL.rt60_s, rel=0.1)


def test_direct_to_reverberant_ratio_falls_with_distance():
    tail = rooms.late_tail(TYPICAL)
    drr = []
    for dist in (0.5, 1.0, 2.0, 4.0):
        h = tail.copy()
        h[:, : rooms.N_EARLY] += rooms.early_rir(TYPICAL, 0.0, 0.0, dist)
        direct_end = int(np.ceil(dist / rooms.SPEED_OF_SOUND_M_S * SR)) + 2
        direct = np.sum(h[0, :direct_end] ** 2)
        drr.append(10 * np.log10(direct / np.sum(h[0, direct_end:] ** 2)))
    assert np.all(np.diff(drr) < -3.0), drr  # about -6 dB per doubling of distance
    assert drr[0] > 0 > drr[-1]


def test_moving_source_direction_follows_its_labels_frame_by_frame():
    event = _static_event(cls=5, az=-30.0, dist=2.0, n_frames=30, speed=40.0)
    foa = scenes.render_event(event, ANECHOIC, rooms.late_tail(ANECHOIC))
    delay = int(round(2.0 / rooms.SPEED_OF_SOUND_M_S * SR))
    rows = scenes.event_labels([event])
    assert [r[0] for r in rows] == list(range(30))
    for frame, _, _, az, el, dist in rows:
        seg = foa[:, delay + frame * 2400: delay + (frame + 1) * 2400]
        est = np.rad2deg(np.arctan2(np.sum(seg[0] * seg[1]), np.sum(seg[0] * seg[3])))
        assert est == pytest.approx(az, abs=2.0)
        assert (el, dist) == (0.0, 200.0)


# --- Sounds and labels ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", range(N_CLASSES))
def test_every_labelled_frame_of_an_event_has_sound(cls):
    rng = np.random.default_rng(cls)
    x = synthesize_event(cls, 25 * 2400, rng)
    frame_rms = np.sqrt(np.mean(x.reshape(25, 2400) ** 2, axis=1))
    assert np.all(20 * np.log10(frame_rms / frame_rms.max()) > -45.0)
    assert np.sqrt(np.mean(x**2)) <= 1.0 + 1e-9 and np.abs(x).max() <= 8.0 + 1e-9


def test_written_labels_are_the_rendered_events(tmp_path):
    cfg = SynthConfig(**TINY)
    root = generate_dataset(cfg, tmp_path / "d", progress=False, n_procs=1)
    plan = next(p for p in plan_splits(cfg) if p.split == "dev-train-synth")
    task = recording_tasks(cfg, plan)[0]
    audio, rows = render_task(cfg, plan.domain, task)
    written = read_foa_csv(root / "foa" / plan.split / "metadata_dev" / plan.split / f"{task.stem}.csv")
    assert len(written) == len(rows) > 0
    expected = sorted((r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows)
    got = sorted((int(e["frame"]), int(e["class"]), int(e["source"]), float(e["azimuth"]), float(e["elevation"]),
                  float(e["distance"])) for e in written)
    assert got == expected
    wav, sr = sf.read(root / "foa" / plan.split / "foa_dev" / plan.split / f"{task.stem}.wav", dtype="float32")
    assert sr == SR and wav.shape == (50 * 2400, 4)
    assert np.abs(wav.T - audio).max() < 1e-4  # 16-bit rounding only
    # Each event's frames are exactly its labelled frames (per source, contiguous onset..offset).
    for e in plan_task(cfg, plan.domain, task):
        frames = sorted(r[0] for r in rows if r[2] == e.source)
        assert frames == list(range(e.onset_frame, e.onset_frame + e.n_frames))


def test_scene_statistics_polyphony_same_class_overlaps_and_class_balance():
    cfg = SynthConfig()
    room = make_room(cfg, "real", 1)
    counts, n_frames_same, n_frames_active, max_poly = Counter(), 0, 0, 0
    spec = domain_spec(cfg, "real")
    for i in range(150):
        events = scenes.plan_recording(np.random.default_rng(i), room, spec, 300)
        act = np.zeros((300, N_CLASSES), int)
        for e in events:
            act[e.onset_frame:e.onset_frame + e.n_frames, e.cls] += 1
            counts[e.cls] += 1
            assert 0.5 <= e.distance_m <= 5.0 and -45 <= e.elevation_deg <= 45
            assert rooms.fits(room, e.azimuth_at(np.arange(e.n_frames + 1) * 0.1), e.elevation_deg, e.distance_m)
        max_poly = max(max_poly, act.sum(1).max())
        n_frames_active += int((act.sum(1) > 0).sum())
        n_frames_same += int((act.max(1) > 1).sum())
    assert max_poly == 3
    assert 0 < n_frames_same / n_frames_active < 0.05  # same-class overlaps occur, rarely
    assert counts[0] + counts[1] > 6 * (counts[11] + counts[12])  # STARSS23-like skew
    assert set(counts) == set(range(N_CLASSES))


# --- The dataset ------------------------------------------------------------------------------
def test_smoke_dataset_layout_rooms_and_classes(smoke_data):
    root = Path(smoke_data)
    rooms_by_split, classes_by_role = {}, {"real-test": set(), "synth-test": set()}
    for split, info in SPLITS.items():
        wavs = sorted((root / "stereo_dev" / split).glob("*.wav"))
        csvs = sorted((root / "metadata_dev" / split).glob("*.csv"))
        assert wavs and [w.stem for w in wavs] == [c.stem for c in csvs], split
        fold = 3 if info["role"] == "train" else 4
        names = [re.fullmatch(r"fold(\d)_room(\d+)_mix(\d{3})_deg(\d{3})_start(\d{4})", w.stem) for w in wavs]
        assert all(m and int(m.group(1)) == fold for m in names), split
        rooms_by_split[split] = {int(m.group(2)) for m in names}
        info_audio = sf.info(wavs[0])
        assert (info_audio.channels, info_audio.samplerate, info_audio.frames) == (2, SR, 120_000)
        if info["role"] == "test":
            key = "synth-test" if info["domain"] == "synthetic" else "real-test"
            for c in csvs:
                classes_by_role[key] |= set(read_reference_csv(c)["class"].tolist())
    all_rooms = [r for rs in rooms_by_split.values() for r in rs]
    assert len(all_rooms) == len(set(all_rooms))  # disjoint splits, ids unique over sites
    assert len(rooms_by_split["dev-train-tau"]) >= 2 and len(rooms_by_split["dev-train-sony"]) >= 2
    assert classes_by_role["real-test"] == set(range(N_CLASSES))
    assert classes_by_role["synth-test"] == set(range(N_CLASSES))
    record = json.loads((root / "synth.json").read_text())
    assert record["complete"] and len(record["hash"]) == 12


def test_reference_scored_against_itself_is_perfect(smoke_data):
    from seld.metrics import score_dirs

    for split in ("dev-test-synth", "dev-test-tau"):
        ref = Path(smoke_data) / "metadata_dev" / split
        score = score_dirs(ref, ref)
        assert score.f20 == pytest.approx(100.0) and score.doae_cd == pytest.approx(0.0)


def test_deterministic_independent_of_workers_reused_and_resumed(tmp_path):
    cfg = SynthConfig(**TINY)
    a = generate_dataset(cfg, tmp_path / "a", progress=False, n_procs=1)
    b = generate_dataset(cfg, tmp_path / "b", progress=False, n_procs=2)
    digest = _digest(a)
    assert len(digest) > 20 and digest == _digest(b)
    # Same config: returns at once, nothing rewritten.
    stamp = {p: p.stat().st_mtime_ns for p in a.rglob("*.wav")}
    assert generate_dataset(cfg, a, progress=False) == a
    assert stamp == {p: p.stat().st_mtime_ns for p in a.rglob("*.wav")}
    # Another config in the same folder: a clear error naming the file.
    with pytest.raises(Exception, match="synth.json.*another config"):
        generate_dataset(apply_overrides(cfg, {"seed": 1}), a, progress=False)
    # An interrupted run (a missing recording, a stale temp file, an unconverted split) is resumed
    # and ends byte-identical.
    record = json.loads((b / "synth.json").read_text())
    record.update(complete=False, converted=record["converted"][:2])
    (b / "synth.json").write_text(json.dumps(record))
    victim = next((b / "foa").rglob("*.wav"))
    victim.unlink()
    (victim.parent / f".{victim.name}.tmp-999").write_bytes(b"half")
    (b / "stereo_dev" / "dev-train-synth" / "junk.wav").write_bytes(b"half")
    generate_dataset(cfg, b, progress=False, n_procs=1)
    assert _digest(b) == digest


@pytest.mark.parametrize("key,value,match", [
    ("distance_m_range", (-1.0, 2.0), "distance_m_range"),
    ("classes", (0, 13), "unknown class"),
    ("room_size_m_min", (1.0, 1.0, 2.5), "impossible room"),
    ("room_size_m_max", (4.0, 8.0, 4.0), "impossible room"),
    ("rt60_s_range", (0.05, 0.5), "impossible room"),
    ("real_class_weights", (1.0, 2.0), "13 weights"),
    ("n_real_train_rooms_per_site", 1, "held out"),
])
def test_bad_config_is_a_clear_error(key, value, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(SynthConfig(), {key: value})


def test_cli_bad_config_fails_before_any_work(tmp_path):
    out = tmp_path / "never"
    done = subprocess.run([sys.executable, "-m", "seld", "synth", "--preset", "smoke", "--out", str(out),
                           "--set", "synth.classes=0,13"], capture_output=True, text=True)
    assert done.returncode == 2 and "synth.classes" in done.stderr and not out.exists()


def test_cli_generates_and_reuses(tmp_path):
    cfg = preset_config("smoke", {f"synth.{k}": v for k, v in TINY.items()}).synth
    args = [sys.executable, "-m", "seld", "synth", "--preset", "smoke", "--out", str(tmp_path / "d"),
            "--no-progress", *[a for k, v in TINY.items() for a in ("--set", f"synth.{k}={v}")]]
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "d" / "synth.json").read_text())["config"]["seed"] == cfg.seed
    second = subprocess.run(args, capture_output=True, text=True)
    assert second.returncode == 0 and "reusing" in second.stderr


@pytest.mark.parametrize("splits", [("dev-train-synth", "dev-test-synth"),
                                    ("dev-train-tau", "dev-train-sony", "dev-test-tau", "dev-test-sony")])
def test_stereo_clips_carry_direction_and_distance_cues(smoke_data, splits):
    """In frames with one active event, the L/R level difference follows the labelled azimuth and
    the level falls with the labelled distance (reverberation and noise blur both, as in rooms)."""
    ild, expected, level, log_dist = [], [], [], []
    for split in splits:
        for wav in sorted((Path(smoke_data) / "stereo_dev" / split).glob("*.wav")):
            audio, _ = sf.read(wav)
            events = read_reference_csv(Path(smoke_data) / "metadata_dev" / split / f"{wav.stem}.csv")
            for frame in range(50):
                ev = events[events["frame"] == frame]
                if len(ev) != 1:
                    continue
                left, right = np.sum(audio[frame * 2400:(frame + 1) * 2400] ** 2, axis=0) + 1e-12
                s = np.sin(np.deg2rad(ev["azimuth"][0]))
                ild.append(10 * np.log10(left / right))
                expected.append(np.clip(20 * np.log10((1 + s + 1e-3) / (1 - s + 1e-3)), -30, 30))
                level.append(10 * np.log10(left + right))
                log_dist.append(np.log(ev["distance"][0]))
    assert len(ild) > 200
    assert np.corrcoef(ild, expected)[0, 1] > 0.5
    assert np.corrcoef(level, log_dist)[0, 1] < -0.1
