"""Tests of seld/metrics.py and `seld evaluate`: golden cases of spec §6, agreement with a literal
per-frame implementation of the official scorer on random file sets, jackknife, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import stats
from scipy.optimize import linear_sum_assignment

from seld.cli import main as seld_main
from seld.config import N_CLASSES
from seld.errors import DataError
from seld.labels import make_events, read_prediction_csv, read_reference_csv, write_csv
from seld.metrics import (
    COUNTER_NAMES,
    count_errors,
    jackknife_intervals,
    score_counters,
    score_dirs,
    score_events,
)

EPS = np.finfo(float).eps


# --- A literal per-frame implementation of the official scorer (spec §6), kept as the reference --
def _official_load(path):
    """frame -> list of [class, source, azimuth, distance, onscreen], first line skipped."""
    out = {}
    with open(path) as f:
        for line in f.readlines()[1:]:
            v = line.strip().split(",")
            out.setdefault(int(v[0]), []).append([int(v[1]), int(v[2]), float(v[3]), float(v[4]),
                                                  int(v[5])])
    return out


def _official_organize(labels, n_frames, max_tracks=10):
    tracks = set(range(max_tracks))
    out = {f: {} for f in range(n_frames)}
    for f in range(n_frames):
        for cls, src, az, dist, onscreen in labels.get(f, []):
            out[f].setdefault(cls, {})
            if src not in out[f][cls] and src < max_tracks:
                t = src
            else:
                free = list(tracks - out[f][cls].keys())
                t = free[0] if free else 0
            out[f][cls][t] = [az, dist, onscreen]
    return out


def _official_fold(az):
    az = (az + 180) % 360 - 180
    folded = az.copy()
    folded[(-180 <= az) & (az < -90)] = -180 - az[(-180 <= az) & (az < -90)]
    folded[(90 < az) & (az <= 180)] = 180 - az[(90 < az) & (az <= 180)]
    return folded


class _OfficialMetric:
    def __init__(self):
        z = lambda: np.zeros(N_CLASSES)  # noqa: E731
        self.tp, self.fp, self.fps, self.fn, self.de_tp = z(), z(), z(), z(), z()
        self.ang, self.dist, self.rel = z(), z(), z()

    def update(self, pred, gt):
        for f in range(len(gt)):
            for c in range(N_CLASSES):
                if c in gt[f] and c in pred[f]:
                    g = np.array(list(gt[f][c].values()))
                    p = np.array(list(pred[f][c].values()))
                    cost = np.zeros((len(g), len(p)))
                    for i in range(len(g)):
                        for j in range(len(p)):
                            cost[i, j] = abs(_official_fold(g[i:i + 1, 0])[0]
                                             - _official_fold(p[j:j + 1, 0])[0])
                    rows, cols = linear_sum_assignment(cost)
                    e = cost[rows, cols]
                    a = np.abs(g[rows, 1] - p[cols, 1])
                    q = a / (g[rows, 1] + EPS)
                    k = min(len(g), len(p))
                    wrong = int(np.sum((e > 20) | (q > 1.0)))
                    self.ang[c] += e.sum()
                    self.dist[c] += a.sum()
                    self.rel[c] += q.sum()
                    self.tp[c] += k - wrong
                    self.de_tp[c] += k
                    self.fp[c] += max(0, len(p) - len(g))
                    self.fps[c] += wrong
                    self.fn[c] += max(0, len(g) - len(p))
                elif c in gt[f]:
                    self.fn[c] += len(gt[f][c])
                elif c in pred[f]:
                    self.fp[c] += len(pred[f][c])

    def scores(self):
        f = self.tp / (EPS + self.tp + self.fps + 0.5 * (self.fp + self.fn))
        out = [f]
        for total in (self.ang, self.rel, self.dist):
            v = total / (self.de_tp + EPS)
            v[self.de_tp == 0] = np.nan
            out.append(v)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return {"f20": 100 * f.mean(), "doae_cd": np.nanmean(out[1]),
                    "rde_cd": np.nanmean(out[2]), "dist_err_cd": np.nanmean(out[3]),
                    "class_f": 100 * f, "class_doae": out[1], "class_rde": out[2]}


def _official_score(ref_paths, pred_paths):
    metric = _OfficialMetric()
    for rp, pp in zip(ref_paths, pred_paths, strict=True):
        gt = _official_load(rp)
        n_ref = max(gt) if gt else 0
        pred = _official_load(pp)
        n_pred = max(pred) if pred else 0
        metric.update(_official_organize(pred, max(n_pred, n_ref)), _official_organize(gt, n_ref))
    return metric.scores()


def _assert_same(score, expected):
    for key in ("f20", "doae_cd", "rde_cd", "dist_err_cd"):
        np.testing.assert_allclose(getattr(score, key), expected[key], rtol=1e-9, atol=1e-9,
                                   err_msg=key)
    np.testing.assert_allclose([r["f20"] for r in score.classwise], expected["class_f"],
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose([r["doae"] for r in score.classwise], expected["class_doae"],
                               rtol=1e-9, atol=1e-9)


# --- Random file sets with the hard cases -----------------------------------------------------------
def _random_pair(rng):
    n_ref = int(rng.choice([0, 0, 1, 3, 10, 30, 60]))
    classes = rng.integers(0, 4, n_ref) if rng.random() < 0.7 else rng.integers(0, 13, n_ref)
    ref_rows = [(int(rng.integers(0, 50)), int(c), int(rng.integers(0, 3)),
                 int(rng.integers(-90, 91)), int(rng.choice([0, 1, 50, 100, 200, 333])), 0)
                for c in classes]
    if n_ref and rng.random() < 0.1:  # a crowded cell: more than 10 same-class instances
        f, c = ref_rows[0][0], ref_rows[0][1]
        ref_rows += [(f, c, int(rng.integers(0, 14)), int(rng.integers(-90, 91)), 100, 0)
                     for _ in range(int(rng.integers(9, 14)))]
    pred_rows = []
    for frame, cls, _, az, dist, _ in ref_rows:
        if rng.random() < 0.2:
            continue
        daz = float(rng.choice([0, 20, -20, 20.5, 5, 60, 0.5]))
        new_az = az + daz
        if rng.random() < 0.3:  # unfolded: the same folded direction from behind or wrapped
            new_az = float(rng.choice([180 - new_az, new_az + 360, new_az - 360]))
        ddist = float(rng.choice([0, dist, dist + 1, -dist, 10, 0.5]))
        pred_rows.append((frame + int(rng.random() < 0.1), cls, 0, new_az, dist + ddist, 0))
        if rng.random() < 0.1:  # same-class duplicate prediction
            pred_rows.append((frame, cls, 0, az + float(rng.integers(-30, 30)), dist, 0))
    for _ in range(int(rng.integers(0, 6))):  # spurious events, some past the last reference frame
        pred_rows.append((int(rng.integers(0, 60)), int(rng.integers(0, 13)),
                          int(rng.integers(0, 2)), float(rng.uniform(-200, 200)),
                          float(rng.uniform(0, 600)), 0))
    rng.shuffle(pred_rows)
    return make_events(ref_rows), make_events(pred_rows)


def _write_set(root, events_pairs):
    ref_dir, pred_dir = root / "ref" / "dev-test-tau", root / "pred"
    ref_paths, pred_paths = [], []
    for i, (ref, pred) in enumerate(events_pairs):
        name = f"fold4_room{i}_mix001.csv"
        write_csv(ref_dir / name, ref)
        pred_dir.mkdir(parents=True, exist_ok=True)
        # prediction rows written as floats in file order (unsorted, unfolded), as others may write
        lines = ["frame,class,source,azimuth,distance,onscreen"] + [
            f"{e['frame']},{e['class']},{e['source']},{float(e['azimuth'])!r},{float(e['distance'])!r},0"
            for e in pred]
        (pred_dir / name).write_text("\n".join(lines) + "\n")
        ref_paths.append(ref_dir / name)
        pred_paths.append(pred_dir / name)
    return root / "ref", pred_dir, ref_paths, pred_paths


def test_agrees_with_literal_official_implementation_on_random_sets(tmp_path):
    rng = np.random.default_rng(2025)
    n_sets = 500
    for s in range(n_sets):
        pairs = [_random_pair(rng) for _ in range(int(rng.integers(1, 5)))]
        ref_dir, pred_dir, ref_paths, pred_paths = _write_set(tmp_path / f"set{s}", pairs)
        expected = _official_score(ref_paths, pred_paths)
        from_csv = score_dirs(ref_dir, pred_dir)
        refs = [read_reference_csv(p) for p in ref_paths]
        preds = [read_prediction_csv(p) for p in pred_paths]
        in_memory = score_events(refs, preds)
        _assert_same(from_csv, expected)
        _assert_same(in_memory, expected)
        assert from_csv.n_files == len(pairs)


# --- Golden cases of spec §6 -------------------------------------------------------------------------
def _golden_reference():
    return make_events([(f, 0, 0, 30, 200, 0) for f in range(10)] + [(5, 1, 0, 0, 100, 0)])


def _with_changes(changes):
    rows = [tuple(r) for r in _golden_reference().tolist()]
    rows = [changes.get((r[0], r[1]), r) for r in rows]
    return make_events(rows)


def test_golden_perfect_prediction_scores_two_classes_of_thirteen():
    ref = _golden_reference()
    s = score_events([ref], [ref.copy()])
    assert s.f20 == pytest.approx(100 * 2 / 13)
    assert s.doae_cd == 0.0 and s.rde_cd == 0.0
    assert s.classwise[0]["tp"] == 9  # frame 9 (the last annotated) is not scored
    assert s.classwise[2]["f20"] == 0.0 and np.isnan(s.classwise[2]["doae"])


def test_golden_last_annotated_frame_is_not_scored():
    pred = _with_changes({(9, 0): (9, 0, 0, -60, 200, 0)})
    s = score_events([_golden_reference()], [pred])
    assert s.f20 == pytest.approx(100 * 2 / 13)
    assert s.doae_cd == 0.0


def test_golden_wrong_azimuth_at_frame_8():
    pred = _with_changes({(8, 0): (8, 0, 0, -60, 200, 0)})
    s = score_events([_golden_reference()], [pred])
    assert s.classwise[0]["f20"] == pytest.approx(100 * 8 / 9)
    assert s.classwise[0]["doae"] == pytest.approx(10.0)
    assert s.classwise[0]["fp_spatial"] == 1
    assert s.f20 == pytest.approx(100 * (8 / 9 + 1) / 13)


@pytest.mark.parametrize(("pred_az", "error"), [(150, 0.0), (-100, 110.0), (50, 20.0), (50.5, 20.5)])
def test_golden_folded_angular_error(pred_az, error):
    pred = _with_changes({(3, 0): (3, 0, 0, pred_az, 200, 0)})
    s = score_events([_golden_reference()], [pred])
    assert s.classwise[0]["doae"] == pytest.approx(error / 9)
    assert s.classwise[0]["fp_spatial"] == int(error > 20)  # exactly 20 degrees is still correct


@pytest.mark.parametrize(("pred_dist", "spatial_fp"), [(400, 0), (401, 1), (0, 0), (399.5, 0)])
def test_golden_relative_distance_threshold(pred_dist, spatial_fp):
    pred = _with_changes({(3, 0): (3, 0, 0, 30, pred_dist, 0)})
    s = score_events([_golden_reference()], [pred])
    assert s.classwise[0]["fp_spatial"] == spatial_fp
    assert s.classwise[0]["tp"] == 9 - spatial_fp


def test_empty_reference_and_late_predictions_cost_nothing_unless_all_frames():
    ref = make_events([(4, 2, 0, 10, 100, 0), (7, 2, 0, 10, 100, 0)])
    pred = make_events([(4, 2, 0, 10, 100, 0), (7, 3, 0, 0, 100, 0), (30, 5, 0, 0, 100, 0)])
    empty_ref, spurious = make_events([]), make_events([(0, 1, 0, 0, 100, 0)])
    official = score_events([ref, empty_ref], [pred, spurious])
    assert official.classwise[2]["tp"] == 1 and official.classwise[2]["fn"] == 0
    assert sum(r["fp"] for r in official.classwise) == 0
    every = score_events([ref, empty_ref], [pred, spurious], score_all_frames=True)
    assert (every.classwise[2]["tp"], every.classwise[2]["fn"]) == (1, 1)
    assert [every.classwise[c]["fp"] for c in (1, 3, 5)] == [1, 1, 1]


def test_same_class_instances_are_matched_by_hungarian():
    ref = make_events([(0, 4, 0, 10, 100, 0), (0, 4, 1, -40, 300, 0), (1, 4, 0, 0, 100, 0)])
    pred = make_events([(0, 4, 0, -35, 300, 0), (0, 4, 0, 12, 100, 0), (0, 4, 0, 80, 100, 0)])
    s = score_events([ref], [pred])
    row = s.classwise[4]
    assert (row["tp"], row["fp_spatial"], row["fp"], row["fn"], row["matched"]) == (2, 0, 1, 0, 2)
    assert row["doae"] == pytest.approx((2 + 5) / 2)


def test_counters_layout_and_pooling():
    rng = np.random.default_rng(7)
    pairs = [_random_pair(rng) for _ in range(6)]
    counters = count_errors([p[0] for p in pairs], [p[1] for p in pairs])
    assert counters.shape == (6, 13, len(COUNTER_NAMES))
    pooled = score_counters(counters.sum(axis=0))
    assert pooled.f20 == pytest.approx(score_counters(counters).f20)


def test_jackknife_by_subtraction_equals_leave_one_out_reruns(tmp_path):
    rng = np.random.default_rng(11)
    pairs = [_random_pair(rng) for _ in range(7)]
    pairs[0] = (_golden_reference(), _golden_reference())  # keeps every partial estimate finite
    _, _, ref_paths, pred_paths = _write_set(tmp_path, pairs)
    s = score_events([p[0] for p in pairs], [p[1] for p in pairs], jackknife=True)
    n = len(pairs)
    glob = _official_score(ref_paths, pred_paths)
    for key in ("f20", "doae_cd", "rde_cd"):
        partial = np.array([_official_score(ref_paths[:i] + ref_paths[i + 1:],
                                            pred_paths[:i] + pred_paths[i + 1:])[key]
                            for i in range(n)])
        mean = partial.mean()
        bias = (n - 1) * (mean - glob[key])
        std_err = np.sqrt((n - 1) * np.mean((partial - mean) ** 2))
        t = stats.t.ppf(0.975, n - 1)
        got = s.intervals[key]
        assert got["estimate"] == pytest.approx(glob[key] - bias, rel=1e-9, abs=1e-9)
        assert got["std_err"] == pytest.approx(std_err, rel=1e-7, abs=1e-9)
        assert got["low"] == pytest.approx(glob[key] - bias - t * std_err, rel=1e-7, abs=1e-9)
        assert got["high"] == pytest.approx(glob[key] - bias + t * std_err, rel=1e-7, abs=1e-9)
    with pytest.raises(Exception, match="at least 2 files"):
        jackknife_intervals(s.counters[:1])


def test_score_dirs_errors(tmp_path):
    ref = _golden_reference()
    write_csv(tmp_path / "ref" / "a" / "x.csv", ref)
    write_csv(tmp_path / "pred" / "y.csv", ref)
    with pytest.raises(DataError, match=r"y\.csv"):
        score_dirs(tmp_path / "ref", tmp_path / "pred")
    write_csv(tmp_path / "ref" / "b" / "x.csv", ref)
    (tmp_path / "pred" / "y.csv").rename(tmp_path / "pred" / "x.csv")
    with pytest.raises(DataError, match="two files named x.csv"):
        score_dirs(tmp_path / "ref", tmp_path / "pred")
    (tmp_path / "ref" / "b" / "x.csv").write_text("frame,class\n")
    (tmp_path / "ref" / "a" / "x.csv").unlink()
    with pytest.raises(DataError, match=r"x\.csv:1: expected the header"):
        score_dirs(tmp_path / "ref", tmp_path / "pred")


# --- CLI ------------------------------------------------------------------------------------------------
def _cli_set(tmp_path):
    rng = np.random.default_rng(5)
    pairs = [(_golden_reference(), _with_changes({(8, 0): (8, 0, 0, -60, 200, 0)}))]
    pairs += [_random_pair(rng) for _ in range(4)]
    return _write_set(tmp_path, pairs)


def test_cli_evaluate_json(tmp_path):
    ref_dir, pred_dir, ref_paths, pred_paths = _cli_set(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "seld", "evaluate", str(ref_dir), str(pred_dir),
                           "--json", "--jackknife"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = _official_score(ref_paths, pred_paths)
    assert out["f20"] == pytest.approx(expected["f20"], rel=1e-9)
    assert out["doae_cd"] == pytest.approx(expected["doae_cd"], rel=1e-9)
    assert out["rde_cd"] == pytest.approx(expected["rde_cd"], rel=1e-9)
    assert out["n_files"] == 5
    assert len(out["classwise"]) == 13 and out["classwise"][0]["name"] == "Female speech"
    assert out["jackknife"]["f20"]["low"] <= out["jackknife"]["f20"]["high"]


def test_cli_evaluate_table_and_all_frames(tmp_path, capsys):
    ref_dir, pred_dir, _, _ = _cli_set(tmp_path)
    assert seld_main(["evaluate", str(ref_dir), str(pred_dir)]) == 0
    text = capsys.readouterr().out
    assert "F20" in text and "DOAE_CD" in text and "Female speech" in text
    assert seld_main(["evaluate", str(ref_dir), str(pred_dir), "--json", "--score-all-frames"]) == 0
    assert json.loads(capsys.readouterr().out)["score_all_frames"] is True


def test_cli_evaluate_prediction_without_reference_is_an_error(tmp_path, capsys):
    ref_dir, pred_dir, _, _ = _cli_set(tmp_path)
    write_csv(pred_dir / "stray.csv", _golden_reference())
    assert seld_main(["evaluate", str(ref_dir), str(pred_dir), "--json"]) == 2
    err = capsys.readouterr().err
    assert "stray.csv" in err and "no reference" in err
    assert seld_main(["evaluate", str(tmp_path / "nowhere"), str(pred_dir)]) == 2
