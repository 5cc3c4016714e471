"""Tests of seld/labels.py: CSV readers/writers, azimuth folding, target encoding and decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seld.errors import DataError
from seld.labels import (
    EVENT_DTYPE,
    FOA_EVENT_DTYPE,
    STEREO_HEADER,
    decode_accdoa,
    decode_multi_accdoa,
    encode_accdoa,
    encode_multi_accdoa,
    fold_azimuth,
    make_events,
    read_csv_table,
    read_foa_csv,
    read_prediction_csv,
    read_reference_csv,
    wrap_azimuth,
    write_csv,
    write_foa_csv,
)


def _events_set(ev):
    return sorted((int(e["frame"]), int(e["class"]), int(round(e["azimuth"])),
                   int(round(e["distance"]))) for e in ev)


def _random_events(rng, n, allow_overlap=True):
    rows = []
    for _ in range(n):
        rows.append((rng.integers(0, 50), rng.integers(0, 13), rng.integers(0, 3),
                     rng.integers(-90, 91), rng.integers(20, 500), 0))
    ev = make_events(rows)
    if not allow_overlap:
        _, idx = np.unique(ev["frame"] * 13 + ev["class"], return_index=True)
        ev = ev[np.sort(idx)]
    return ev


# --- azimuths ----------------------------------------------------------------------------------
def test_wrap_and_fold_follow_spec_section_4():
    assert wrap_azimuth(180.0) == -180.0
    assert wrap_azimuth(-180.0) == -180.0
    assert wrap_azimuth(370.0) == 10.0
    np.testing.assert_array_equal(
        fold_azimuth([150, -100, 90, -90, 180, -180, 100, 30, 270, -135]),
        [30, -80, 90, -90, 0, 0, 80, 30, -90, -45])
    phi = np.linspace(-720, 720, 2881)
    np.testing.assert_allclose(fold_azimuth(phi), np.rad2deg(np.arcsin(np.sin(np.deg2rad(phi)))),
                               atol=1e-9)
    assert np.all(np.abs(fold_azimuth(phi)) <= 90)


# --- CSV reading and writing ---------------------------------------------------------------------
def test_write_then_read_reference_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ev = _random_events(rng, 80)
    write_csv(tmp_path / "a.csv", ev)
    text = (tmp_path / "a.csv").read_text().splitlines()
    assert text[0] == STEREO_HEADER
    back = read_reference_csv(tmp_path / "a.csv")
    assert back.dtype == EVENT_DTYPE
    assert _events_set(back) == _events_set(ev)
    assert list(back["frame"]) == sorted(back["frame"])  # written sorted by frame
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary file


def test_write_rounds_floats_to_integers(tmp_path):
    ev = make_events([(3, 2, 0, 29.6, 199.5, 0), (1, 0, 0, -0.4, 300.2, 0)])
    write_csv(tmp_path / "p.csv", ev)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[1:] == ["1,0,0,0,300,0", "3,2,0,30,200,0"]


def test_empty_file_round_trip(tmp_path):
    write_csv(tmp_path / "e.csv", make_events([]))
    assert (tmp_path / "e.csv").read_text() == STEREO_HEADER + "\n"
    assert len(read_reference_csv(tmp_path / "e.csv")) == 0
    assert len(read_prediction_csv(tmp_path / "e.csv")) == 0


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        ("", 1, "expected the header"),
        ("frame,class,source,azimuth,distance\n", 1, "expected the header"),
        ("0,1,0,30,200,0\n", 1, "expected the header"),
        (STEREO_HEADER + "\n0,1,0,30.5,200,0\n", 2, "azimuth must be an integer"),
        (STEREO_HEADER + "\n0,1,0,30,200,0\n0,x,0,30,200,0\n", 3, "class must be an integer"),
        (STEREO_HEADER + "\n0,13,0,30,200,0\n", 2, "class 13 is outside 0..12"),
        (STEREO_HEADER + "\n0,-1,0,30,200,0\n", 2, "class -1"),
        (STEREO_HEADER + "\n50,1,0,30,200,0\n", 2, "frame 50 is outside the clip"),
        (STEREO_HEADER + "\n-1,1,0,30,200,0\n", 2, "frame -1 is outside the clip"),
        (STEREO_HEADER + "\n0,1,0,91,200,0\n", 2, "azimuth 91 is outside [-90, 90]"),
        (STEREO_HEADER + "\n0,1,0,-150,200,0\n", 2, "azimuth -150"),
        (STEREO_HEADER + "\n0,1,0,30,-5,0\n", 2, "distance -5 cm is negative"),
        (STEREO_HEADER + "\n0,1,0,30,200\n", 2, "expected 6 comma-separated values, got 5"),
        (STEREO_HEADER + "\n0,1,0,30,200,0,1\n", 2, "got 7"),
        (STEREO_HEADER + "\n0,1,0,30,200,2\n", 2, "onscreen must be 0 or 1"),
        (STEREO_HEADER + "\n0,1,0,30,200,0\n\n1,1,0,30,200,0\n", 3, "empty line"),
        (STEREO_HEADER + "\n0,1,0,30,nan,0\n", 2, "distance must be an integer"),
        (STEREO_HEADER + "\n0,1-2,0,30,200,0\n", 2, "class must be an integer"),
        (STEREO_HEADER + "\n0,1,0,-,200,0\n", 2, "azimuth must be an integer"),
        (STEREO_HEADER + "\n0,1,0,30,200\n0,1,0,30,200,0,0\n", 2, "got 5"),
        (STEREO_HEADER + "\n0,1,0,30,,0\n", 2, "distance must be an integer"),
    ],
)
def test_strict_reference_reader_names_file_and_line(tmp_path, content, line, fragment):
    path = tmp_path / "fold4_room1_mix001.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_reference_csv(path)
    assert f"{path}:{line}:" in str(err.value)
    assert fragment in str(err.value)
    # the bulk reader gives the same error
    with pytest.raises(DataError) as err2:
        read_csv_table([path], "reference")
    assert str(err2.value) == str(err.value)


def test_reference_reader_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_reference_csv(tmp_path / "nope.csv")


def test_prediction_reader_is_lenient_as_official(tmp_path):
    path = tmp_path / "p.csv"
    # any first line is skipped; floats for azimuth/distance; unfolded azimuths and late frames kept
    path.write_text("whatever header\n0,1,0,150.5,200.25,0\n\n70,12,3,-170,0.5,1\n")
    ev = read_prediction_csv(path)
    assert ev["azimuth"].tolist() == [150.5, -170.0]
    assert ev["distance"].tolist() == [200.25, 0.5]
    assert ev["frame"].tolist() == [0, 70]
    path.write_text(STEREO_HEADER + "\n0,1,0,30,200,0\n1.5,1,0,30,200,0\n")
    with pytest.raises(DataError, match=r"p\.csv:3: frame must be an integer"):
        read_prediction_csv(path)
    path.write_text(STEREO_HEADER + "\n0,13,0,30,200,0\n")
    with pytest.raises(DataError, match=r"p\.csv:2: class 13"):
        read_prediction_csv(path)
    path.write_text(STEREO_HEADER + "\n0,1,0,30,200,0\n0,2,0,nan,200,0\n")
    for read in (read_prediction_csv, lambda q: read_csv_table([q], "prediction")):
        with pytest.raises(DataError, match=r"p\.csv:3: azimuth must be a finite number"):
            read(path)


def test_bulk_reader_equals_per_file_readers(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(30):
        p = tmp_path / f"f{i}.csv"
        ev = _random_events(rng, int(rng.integers(0, 20)))
        write_csv(p, ev)
        paths.append(p)
    # non-canonical but valid variants go through the line-by-line path
    (tmp_path / "f3.csv").write_text(STEREO_HEADER + "\r\n1,2,0,30,200,0\r\n 4,5,1,-20,100,0\r\n")
    (tmp_path / "f4.csv").write_text(STEREO_HEADER)  # no newline at all
    (tmp_path / "f5.csv").write_text(STEREO_HEADER + "\n3,4,0,10,100,0")  # no final newline
    for kind, reader in (("reference", read_reference_csv), ("prediction", read_prediction_csv)):
        events, file_index = read_csv_table(paths, kind)
        for i, p in enumerate(paths):
            np.testing.assert_array_equal(events[file_index == i], reader(p))
    preds = tmp_path / "pred.csv"
    preds.write_text("h\n1,2,0,150.5,1e2,0\n2,3,0,-1e1,inf,0\n3,3,0,.5,nan,0\n")
    events, _ = read_csv_table([preds], "prediction")
    expected = read_prediction_csv(preds)
    for name in EVENT_DTYPE.names:  # field-wise: NaN equals NaN
        np.testing.assert_array_equal(events[name], expected[name])


def test_foa_csv_round_trip_and_errors(tmp_path):
    ev = make_events([(0, 3, 1, 170, 20, 150), (5, 0, 0, -180, -45, 300), (7, 3, 0, 180, 0, 50)],
                     FOA_EVENT_DTYPE)
    write_foa_csv(tmp_path / "foa.csv", ev)
    back = read_foa_csv(tmp_path / "foa.csv")
    assert back.dtype == FOA_EVENT_DTYPE
    assert back["azimuth"].tolist() == [170, -180, -180]  # 180 is wrapped to -180
    assert back["elevation"].tolist() == [20, -45, 0]
    # DCASE2024 files have no header line
    (tmp_path / "nohead.csv").write_text("0,3,1,170,20,150\n1,3,1,171,20,150\n")
    assert len(read_foa_csv(tmp_path / "nohead.csv")) == 2
    (tmp_path / "bad.csv").write_text("0,3,1,170,20,150\n1,3,1,171,95,150\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: elevation 95"):
        read_foa_csv(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("0,3,1,170,20,150\n1,3,1,200,10,150\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: azimuth 200"):
        read_foa_csv(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("0,3,1,170,20,150\n600,3,1,100,10,150\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: frame 600"):
        read_foa_csv(tmp_path / "bad.csv", n_frames=600)


# --- ACCDOA ------------------------------------------------------------------------------------
def test_encode_accdoa_layout_and_units():
    ev = make_events([(2, 4, 0, 30, 250, 0), (2, 5, 0, 150, 100, 0)])
    target, n_over = encode_accdoa(ev)
    assert target.shape == (50, 13, 4) and target.dtype == np.float32
    assert n_over == 0
    np.testing.assert_allclose(target[2, 4], [1, np.cos(np.pi / 6), 0.5, 2.5], atol=1e-6)
    np.testing.assert_allclose(target[2, 5], [1, np.cos(np.pi / 6), 0.5, 1.0], atol=1e-6)  # folded
    assert target.sum() == pytest.approx(target[2, 4].sum() + target[2, 5].sum())


def test_accdoa_round_trip_without_overlaps(tmp_path):
    rng = np.random.default_rng(2)
    for trial in range(5):
        ev = _random_events(rng, 60, allow_overlap=False)
        write_csv(tmp_path / "ref.csv", ev)
        target, n_over = encode_accdoa(read_reference_csv(tmp_path / "ref.csv"))
        assert n_over == 0
        out = np.concatenate([target[..., 1:3], target[..., 3:]], axis=-1)  # (x, y, dist)
        write_csv(tmp_path / "out.csv", decode_accdoa(out, 0.5))
        assert _events_set(read_reference_csv(tmp_path / "out.csv")) == _events_set(ev), trial


def test_accdoa_same_class_overlap_keeps_nearest_and_counts():
    ev = make_events([
        (3, 1, 0, 40, 300, 0), (3, 1, 1, -20, 120, 0), (3, 1, 2, 10, 400, 0),  # 3 in one cell
        (4, 1, 0, 40, 300, 0), (4, 1, 1, 60, 300, 0),  # tie on distance: first in file order
        (4, 2, 0, 5, 90, 0),
    ])
    target, n_over = encode_accdoa(ev)
    assert n_over == 2
    out = np.concatenate([target[..., 1:3], target[..., 3:]], axis=-1)
    assert _events_set(decode_accdoa(out)) == [(3, 1, -20, 120), (4, 1, 40, 300), (4, 2, 5, 90)]


def test_decode_accdoa_thresholds_per_class_and_torch_input():
    out = np.zeros((50, 13, 3), dtype=np.float32)
    out[0, 0] = [0.3, 0.3, 1.0]  # norm 0.42
    out[0, 1] = [0.3, 0.3, 2.0]
    out[1, 2] = [-0.6, 0.0, 1.234]  # behind: folds to the front, az 180 -> 0
    thr = np.full(13, 0.5)
    thr[0] = 0.4
    ev = decode_accdoa(torch.from_numpy(out), thr)
    assert [(e["frame"], e["class"]) for e in ev] == [(0, 0), (1, 2)]
    assert ev["azimuth"][0] == pytest.approx(45.0)
    assert ev["azimuth"][1] == pytest.approx(0.0)
    assert ev["distance"].tolist() == [100.0, 123.0]
    assert np.all(ev["source"] == 0) and np.all(ev["onscreen"] == 0)


# --- multi-ACCDOA / ADPIT -------------------------------------------------------------------------
def test_encode_multi_accdoa_slots():
    ev = make_events([
        (0, 3, 0, 10, 100, 0),  # one event -> A0
        (1, 3, 0, 20, 100, 0), (1, 3, 1, -20, 200, 0),  # two -> B0, B1
        (2, 3, 0, 30, 100, 0), (2, 3, 1, 0, 200, 0), (2, 3, 2, -30, 300, 0),  # three -> C0..C2
        (3, 3, 0, 1, 100, 0), (3, 3, 1, 2, 100, 0), (3, 3, 2, 3, 100, 0), (3, 3, 3, 4, 100, 0),
        (3, 3, 4, 5, 100, 0),  # five -> C0..C2, two dropped
    ])
    target, n_dropped = encode_multi_accdoa(ev)
    assert target.shape == (50, 6, 13, 4) and target.dtype == np.float32
    assert n_dropped == 2
    act = target[..., 0]
    assert act[0, :, 3].tolist() == [1, 0, 0, 0, 0, 0]
    assert act[1, :, 3].tolist() == [0, 1, 1, 0, 0, 0]
    assert act[2, :, 3].tolist() == [0, 0, 0, 1, 1, 1]
    assert act[3, :, 3].tolist() == [0, 0, 0, 1, 1, 1]
    assert act.sum() == 1 + 2 + 3 + 3
    az = np.rad2deg(np.arctan2(target[..., 2], target[..., 1]))
    np.testing.assert_allclose(az[2, 3:, 3], [30, 0, -30], atol=1e-4)
    np.testing.assert_allclose(az[3, 3:, 3], [1, 2, 3], atol=1e-4)
    np.testing.assert_allclose(target[1, 1:3, 3, 3], [1.0, 2.0])


def _adpit_to_tracks(target):
    """Official-style collapse of the 6 ADPIT slots to 3 output tracks (x, y, distance)."""
    xyd = np.concatenate([target[..., 1:3], target[..., 3:]], axis=-1)  # (T, 6, 13, 3)
    # only one of the A/B/C groups is active per cell: track k = A0 + B_k + C_k
    return np.stack([xyd[:, 0] + xyd[:, 1] + xyd[:, 3], xyd[:, 2] + xyd[:, 4], xyd[:, 5]], axis=1)


def test_multi_accdoa_round_trip_and_merge(tmp_path):
    rng = np.random.default_rng(3)
    ev = _random_events(rng, 60, allow_overlap=False)
    # add same-class partners far apart (kept) in a few cells
    extra = make_events([(int(e["frame"]), int(e["class"]), 1,
                          -e["azimuth"] if abs(e["azimuth"]) >= 20 else e["azimuth"] + 60,
                          e["distance"] + 50, 0) for e in ev[:10]])
    ev = np.concatenate([ev, extra])
    write_csv(tmp_path / "ref.csv", ev)
    target, n_dropped = encode_multi_accdoa(read_reference_csv(tmp_path / "ref.csv"))
    assert n_dropped == 0
    out = _adpit_to_tracks(target)
    assert out.shape == (50, 3, 13, 3)
    back = decode_multi_accdoa(out, 0.5)
    assert _events_set(back) == _events_set(ev)
    # two tracks 10 degrees apart are merged into one event at their mean
    out = np.zeros((50, 3, 13, 3))
    for track, deg, dist in ((0, 10, 1.0), (1, 20, 2.0), (2, 60, 3.0)):
        out[7, track, 5] = [np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg)), dist]
    merged = decode_multi_accdoa(out, 0.5, merge_deg=15)
    assert len(merged) == 2
    assert merged["azimuth"][0] == pytest.approx(15.0, abs=1e-6)
    assert merged["distance"].tolist() == [150.0, 300.0]
    assert merged["azimuth"][1] == pytest.approx(60.0)
    assert len(decode_multi_accdoa(out, 0.5, merge_deg=5)) == 3


def _decode_multi_accdoa_cell_by_cell(out: np.ndarray, thresholds, merge_deg: float = 15.0) -> np.ndarray:
    """The multi-ACCDOA decoding written cell by cell (seld's decoder before it was batched): the
    reference the batched decoder must equal bit for bit."""
    from seld.labels import _events_from_cells, _thresholds

    active = np.hypot(out[..., 0], out[..., 1]) > _thresholds(thresholds)[None, None, :]
    frames, clss, xs, ys, ds = [], [], [], [], []
    cos_merge = np.cos(np.deg2rad(merge_deg))
    for f, c in zip(*np.nonzero(active.any(axis=1)), strict=True):
        tracks = np.flatnonzero(active[f, :, c])
        vec = out[f, tracks, c, :]
        unit = vec[:, :2] / np.linalg.norm(vec[:, :2], axis=1, keepdims=True)
        close = unit @ unit.T > cos_merge
        label = np.arange(len(tracks))
        for _ in range(len(tracks)):
            label = np.array([label[close[i]].min() for i in range(len(tracks))])
        for g in np.unique(label):
            mean = vec[label == g].mean(axis=0)
            frames.append(f)
            clss.append(c)
            xs.append(mean[0])
            ys.append(mean[1])
            ds.append(mean[2])
    return _events_from_cells(np.array(frames, dtype=np.int64), np.array(clss, dtype=np.int64),
                              np.array(xs), np.array(ys), np.array(ds))


def test_multi_accdoa_decoding_equals_the_cell_by_cell_decoding_bit_for_bit():
    """The batched decoder gives the cell-by-cell decoder's events, bit for bit (order, values), on
    outputs where every pattern of active tracks occurs and tracks merge in twos and threes (some
    chained: A~B, B~C, A not ~C), at one and at per-class thresholds, and on no active track."""
    rng = np.random.default_rng(11)
    out = rng.normal(0.0, 0.45, size=(80, 3, 13, 3))
    out[..., 2] = rng.uniform(0.2, 4.0, out.shape[:-1])
    # Directions near one another in a third of the cells: merges of two and of three tracks.
    base = rng.uniform(-np.pi, np.pi, size=(80, 1, 13))
    spread = rng.choice([0.05, 0.2, 0.3], size=(80, 3, 13)) * rng.choice([-1, 1], size=(80, 3, 13))
    chained = base + np.cumsum(spread, axis=1)
    radius = rng.uniform(0.3, 1.0, size=(80, 3, 13))
    near = rng.random((80, 1, 13)) < 0.35
    out[..., 0] = np.where(near, radius * np.cos(chained), out[..., 0])
    out[..., 1] = np.where(near, radius * np.sin(chained), out[..., 1])
    for thresholds in (0.3, 0.5, rng.uniform(0.1, 0.9, 13)):
        got, want = decode_multi_accdoa(out, thresholds), _decode_multi_accdoa_cell_by_cell(out, thresholds)
        assert len(want) > 1000 and got.dtype == want.dtype and got.tobytes() == want.tobytes()
    merged = len(_decode_multi_accdoa_cell_by_cell(out, 0.3, merge_deg=0.01)) - len(
        _decode_multi_accdoa_cell_by_cell(out, 0.3))
    assert merged > 100  # the outputs exercised merging
    assert decode_multi_accdoa(out, 0.3, merge_deg=0.01).tobytes() == \
        _decode_multi_accdoa_cell_by_cell(out, 0.3, merge_deg=0.01).tobytes()
    assert decode_multi_accdoa(np.zeros((5, 3, 13, 3)), 0.5).tobytes() == \
        _decode_multi_accdoa_cell_by_cell(np.zeros((5, 3, 13, 3)), 0.5).tobytes()
    assert len(decode_multi_accdoa(np.zeros((5, 3, 13, 3)), 0.5)) == 0
